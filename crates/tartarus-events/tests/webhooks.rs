//! Outbound webhooks against a receiver in the test (axum on loopback) that checks every signature: events
//! arrive signed and in order, failures are retried with the same delivery id, a receiver that hangs is
//! cut off by the timeout, and requests in flight stay within the concurrency bound.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;
use support::wait_for;
use tartarus_events::webhooks::{self, Webhook, WebhookLimits};
use tartarus_events::{Event, EventBus, Subject, SubjectFilter};

const SECRET: &[u8] = b"webhook-secret-0123456789";

#[derive(Default)]
struct Receiver {
    /// Verified deliveries: (delivery id, subject, body).
    received: Mutex<Vec<(String, String, serde_json::Value)>>,
    /// Attempts per delivery id.
    attempts: Mutex<HashMap<String, usize>>,
    bad_signatures: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// How the receiver answers.
#[derive(Clone, Copy)]
enum Behaviour {
    /// 500 to the first attempt of each delivery, then 200.
    FailFirst,
    /// Never answers.
    Hang,
    /// 200 after holding the request for a while.
    Slow,
}

async fn receiver(behaviour: Behaviour) -> (url::Url, Arc<Receiver>) {
    let state = Arc::new(Receiver::default());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let state = state.clone();
            move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { receive(&state, behaviour, &headers, &body).await }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (
        url::Url::parse(&format!("http://{addr}/hook")).expect("url"),
        state,
    )
}

async fn receive(state: &Receiver, behaviour: Behaviour, headers: &HeaderMap, body: &[u8]) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let timestamp: i64 = header(webhooks::TIMESTAMP_HEADER).parse().unwrap_or(0);
    if !webhooks::verify(SECRET, timestamp, body, &header(webhooks::SIGNATURE_HEADER)) {
        state.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    let delivery = header(webhooks::DELIVERY_HEADER);
    let attempt = {
        let mut attempts = state.attempts.lock().expect("lock");
        let n = attempts.entry(delivery.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let now_in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.most_in_flight.fetch_max(now_in_flight, Ordering::SeqCst);
    let status = match behaviour {
        Behaviour::FailFirst if attempt == 1 => StatusCode::INTERNAL_SERVER_ERROR,
        Behaviour::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK
        }
        Behaviour::Slow => {
            tokio::time::sleep(Duration::from_millis(150)).await;
            StatusCode::OK
        }
        Behaviour::FailFirst => StatusCode::OK,
    };
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    if status == StatusCode::OK {
        let value: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
        state
            .received
            .lock()
            .expect("lock")
            .push((delivery, header(webhooks::EVENT_HEADER), value));
    }
    status
}

fn hook(name: &str, url: url::Url, filter: &str) -> Webhook {
    Webhook {
        name: name.to_string(),
        url,
        secret: SECRET.to_vec(),
        filter: SubjectFilter::new(filter).expect("filter"),
    }
}

fn limits() -> WebhookLimits {
    WebhookLimits {
        concurrency: 2,
        timeout: Duration::from_millis(500),
        attempts: 3,
        first_retry: Duration::from_millis(50),
    }
}

fn event(subject: &str, n: u64) -> Event {
    Event::new(
        Subject::new(subject).expect("subject"),
        Some("team-a"),
        json!({ "n": n }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_events_arrive_in_order_and_failures_are_retried() {
    let bus: Arc<dyn EventBus> = Arc::new(tartarus_events::memory::MemoryBus::new(1000));
    let (url, state) = receiver(Behaviour::FailFirst).await;
    let _tasks = webhooks::spawn(bus.clone(), vec![hook("tasks", url, "task.>")], limits())
        .await
        .expect("webhooks");
    let published: Vec<Event> = (0..5).map(|n| event("task.completed", n)).collect();
    bus.publish(&event("sandbox.created", 99)).await.expect("publish");
    for e in &published {
        bus.publish(e).await.expect("publish");
    }
    wait_for(Duration::from_secs(20), "five verified deliveries", || {
        let count = state.received.lock().expect("lock").len();
        async move { count == 5 }
    })
    .await;
    let received = state.received.lock().expect("lock").clone();
    for ((delivery, subject, body), expected) in received.iter().zip(&published) {
        assert_eq!(delivery, &expected.id, "in publish order");
        assert_eq!(subject, "task.completed");
        assert_eq!(
            body,
            &serde_json::to_value(expected).expect("json"),
            "the event as published"
        );
    }
    let attempts = state.attempts.lock().expect("lock").clone();
    assert!(
        attempts.values().all(|n| *n == 2),
        "each failed once, then succeeded: {attempts:?}"
    );
    assert_eq!(state.bad_signatures.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_hangs_is_timed_out_and_does_not_hold_up_others() {
    let bus: Arc<dyn EventBus> = Arc::new(tartarus_events::memory::MemoryBus::new(1000));
    let (hanging_url, hanging) = receiver(Behaviour::Hang).await;
    let (good_url, good) = receiver(Behaviour::FailFirst).await;
    let _tasks = webhooks::spawn(
        bus.clone(),
        vec![hook("hangs", hanging_url, ">"), hook("good", good_url, ">")],
        limits(),
    )
    .await
    .expect("webhooks");
    bus.publish(&event("sandbox.ended", 1)).await.expect("publish");
    bus.publish(&event("sandbox.ended", 2)).await.expect("publish");
    wait_for(
        Duration::from_secs(20),
        "the good receiver to get both events",
        || {
            let count = good.received.lock().expect("lock").len();
            async move { count == 2 }
        },
    )
    .await;
    // The hanging receiver got every attempt (3) of the first event, each cut off by the timeout, then
    // the next event's.
    wait_for(
        Duration::from_secs(20),
        "the hanging receiver's attempts to be timed out",
        || {
            let attempts = hanging.attempts.lock().expect("lock").clone();
            async move { attempts.len() == 2 && attempts.values().next().is_some_and(|n| *n >= 1) }
        },
    )
    .await;
    let attempts = hanging.attempts.lock().expect("lock").clone();
    assert!(
        attempts.values().any(|n| *n == 3),
        "the first event was tried 3 times: {attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_stay_within_the_bound() {
    let bus: Arc<dyn EventBus> = Arc::new(tartarus_events::memory::MemoryBus::new(1000));
    let (url, state) = receiver(Behaviour::Slow).await;
    let hooks = (0..5).map(|n| hook(&format!("h{n}"), url.clone(), ">")).collect();
    let _tasks = webhooks::spawn(bus.clone(), hooks, limits())
        .await
        .expect("webhooks");
    for n in 0..4 {
        bus.publish(&event("task.created", n)).await.expect("publish");
    }
    wait_for(Duration::from_secs(30), "20 deliveries", || {
        let count = state.received.lock().expect("lock").len();
        async move { count == 20 }
    })
    .await;
    let most = state.most_in_flight.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} requests in flight, the bound is 2");
    assert!(
        most == 2,
        "the hooks were never concurrent (most in flight {most})"
    );
}

#[tokio::test]
async fn a_wrong_secret_is_refused_by_the_receiver() {
    let bus: Arc<dyn EventBus> = Arc::new(tartarus_events::memory::MemoryBus::new(10));
    let (url, state) = receiver(Behaviour::FailFirst).await;
    let mut wrong = hook("wrong", url, ">");
    wrong.secret = b"not-the-secret".to_vec();
    let _tasks = webhooks::spawn(bus.clone(), vec![wrong], limits())
        .await
        .expect("webhooks");
    bus.publish(&event("task.created", 1)).await.expect("publish");
    wait_for(Duration::from_secs(20), "three refused attempts", || {
        let bad = state.bad_signatures.load(Ordering::SeqCst);
        async move { bad == 3 }
    })
    .await;
    assert!(state.received.lock().expect("lock").is_empty());
}
