//! The provider conformance suite: every property of the bus contract (the crate's doc) checked once, as a
//! function of the provider, and run against each: in-memory and the real PostgreSQL, NATS (JetStream)
//! and Redis servers of this machine. A server that is not there fails its provider's tests.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{assert_quiet, bus, cleanup, fresh_namespace, next, wait_for};
use tartarus_events::{BusError, Event, Provider, Publisher, Subject, SubjectFilter, SubscribeOptions};

const DEADLINE: Duration = Duration::from_secs(20);

fn event(subject: &str, data: serde_json::Value) -> Event {
    Event::new(Subject::new(subject).expect("a subject"), Some("team-a"), data)
}

fn options(consumer: &str, filter: &str) -> SubscribeOptions {
    let mut options = SubscribeOptions::new(consumer, SubjectFilter::new(filter).expect("a filter"));
    options.redelivery_after = Duration::from_secs(1);
    options
}

/// One test per provider and check: `<group>::<Provider>::<check>`.
macro_rules! suite {
    (group: $group:ident, providers: [$($provider:ident),*], checks: $checks:tt) => {
        mod $group {
            $( suite!(@provider $provider, $checks); )*
        }
    };
    (@provider $provider:ident, [$($check:ident),*]) => {
        #[allow(non_snake_case)]
        mod $provider {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::super::$check(tartarus_events::Provider::$provider).await;
                }
            )*
        }
    };
}

suite!(
    group: contract,
    providers: [Memory, Postgres, Nats, Redis],
    checks: [
        delivers_matching_events_to_each_consumer,
        keeps_the_order_of_each_subject,
        redelivers_what_was_not_acknowledged_after_a_reconnect,
        a_slow_subscriber_never_stalls_publishers,
        refuses_bad_input
    ]
);

// The in-memory bus has no server to lose.
suite!(
    group: outages,
    providers: [Postgres, Nats, Redis],
    checks: [
        a_provider_that_is_not_there_is_a_clear_error,
        a_provider_that_goes_down_is_retried_with_backoff
    ]
);

async fn delivers_matching_events_to_each_consumer(provider: Provider) {
    let namespace = fresh_namespace();
    let bus = bus(provider, &namespace).await;
    let mut tasks = bus
        .subscribe(options("tasks", "task.>"))
        .await
        .expect("subscribe");
    let mut everything = bus
        .subscribe(options("everything", ">"))
        .await
        .expect("subscribe");
    let published = [
        event("task.created", json!({"task": "t1"})),
        event("sandbox.created", json!({"sandbox": "s1"})),
        event("task.completed", json!({"task": "t1", "output": "done"})),
    ];
    for e in &published {
        bus.publish(e).await.expect("publish");
    }
    for expected in [&published[0], &published[2]] {
        let delivery = next(&mut tasks, DEADLINE, "a task event").await;
        assert_eq!(&delivery.event, expected, "delivered as published");
        delivery.ack().await.expect("ack");
    }
    for expected in &published {
        let delivery = next(&mut everything, DEADLINE, "an event").await;
        assert_eq!(&delivery.event, expected);
        delivery.ack().await.expect("ack");
    }
    assert_quiet(
        &mut tasks,
        Duration::from_millis(300),
        "the task filter let a sandbox event through",
    )
    .await;
    cleanup(provider, &namespace).await;
}

async fn keeps_the_order_of_each_subject(provider: Provider) {
    let namespace = fresh_namespace();
    let bus = bus(provider, &namespace).await;
    let mut subscription = bus.subscribe(options("ordered", ">")).await.expect("subscribe");
    let subjects = ["sandbox.created", "sandbox.started", "sandbox.ended"];
    for n in 0..120 {
        bus.publish(&event(subjects[n % 3], json!({ "n": n })))
            .await
            .expect("publish");
    }
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..120 {
        let delivery = next(&mut subscription, DEADLINE, "the next of 120 events").await;
        let n = delivery.event.data["n"].as_u64().expect("n");
        seen.entry(delivery.event.subject.to_string())
            .or_default()
            .push(n);
        delivery.ack().await.expect("ack");
    }
    for (subject, ns) in &seen {
        assert_eq!(ns.len(), 40, "{subject}: {ns:?}");
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{subject} out of order: {ns:?}"
        );
    }
    cleanup(provider, &namespace).await;
}

async fn redelivers_what_was_not_acknowledged_after_a_reconnect(provider: Provider) {
    let namespace = fresh_namespace();
    let bus = bus(provider, &namespace).await;
    let mut subscription = bus
        .subscribe(options("durable", "task.>"))
        .await
        .expect("subscribe");
    let first: Vec<Event> = (1..=3)
        .map(|n| event("task.started", json!({ "n": n })))
        .collect();
    for e in &first {
        bus.publish(e).await.expect("publish");
    }
    let one = next(&mut subscription, DEADLINE, "event 1").await;
    assert_eq!(one.event, first[0]);
    one.ack().await.expect("ack");
    let two = next(&mut subscription, DEADLINE, "event 2").await;
    assert_eq!(two.event, first[1]);
    // The subscriber goes away holding event 2 unacknowledged (and maybe 3 in its buffer).
    drop(two);
    drop(subscription);
    let while_away = event("task.completed", json!({ "n": 4 }));
    bus.publish(&while_away)
        .await
        .expect("publish while no subscriber is connected");

    let mut again = bus
        .subscribe(options("durable", "task.>"))
        .await
        .expect("subscribe again");
    let wanted: BTreeSet<String> = [&first[1], &first[2], &while_away]
        .iter()
        .map(|e| e.id.clone())
        .collect();
    let mut got = BTreeSet::new();
    let started = Instant::now();
    while got != wanted {
        let delivery = next(&mut again, DEADLINE, "the unacknowledged and the new events").await;
        assert_ne!(
            delivery.event.id, first[0].id,
            "an acknowledged event was delivered again"
        );
        got.insert(delivery.event.id.clone());
        delivery.ack().await.expect("ack");
        assert!(started.elapsed() < DEADLINE, "got {got:?}, want {wanted:?}");
    }
    // Everything acknowledged: a third subscription gets nothing old.
    drop(again);
    let mut third = bus
        .subscribe(options("durable", "task.>"))
        .await
        .expect("subscribe a third time");
    assert_quiet(
        &mut third,
        Duration::from_millis(1500),
        "acknowledged events came back",
    )
    .await;
    cleanup(provider, &namespace).await;
}

async fn a_slow_subscriber_never_stalls_publishers(provider: Provider) {
    let namespace = fresh_namespace();
    let bus = bus(provider, &namespace).await;
    let mut slow_options = options("slow", ">");
    slow_options.buffer = 4;
    let mut slow = bus.subscribe(slow_options).await.expect("subscribe");
    let mut fast = bus.subscribe(options("fast", ">")).await.expect("subscribe");
    let reader = tokio::spawn(async move {
        let mut count = 0;
        while count < 300 {
            let delivery = next(&mut fast, DEADLINE, "the fast subscriber's next event").await;
            delivery.ack().await.expect("ack");
            count += 1;
        }
        count
    });
    let mut slowest = Duration::ZERO;
    for n in 0..300 {
        let started = Instant::now();
        bus.publish(&event("sandbox.started", json!({ "n": n })))
            .await
            .expect("publish");
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a publish took {slowest:?} while a subscriber read nothing"
    );
    assert_eq!(
        reader.await.expect("the fast reader"),
        300,
        "the fast subscriber missed events"
    );
    // The slow one still gets the events, from the first, when it reads.
    let first = next(&mut slow, DEADLINE, "the slow subscriber's first event").await;
    assert_eq!(first.event.data["n"], 0);
    cleanup(provider, &namespace).await;
}

async fn refuses_bad_input(provider: Provider) {
    let namespace = fresh_namespace();
    let bus = bus(provider, &namespace).await;
    let big = event(
        "task.created",
        json!("x".repeat(tartarus_events::MAX_EVENT_BYTES)),
    );
    assert!(matches!(bus.publish(&big).await, Err(BusError::TooLarge { .. })));
    let mut bad_name = options("durable", ">");
    bad_name.consumer = "no spaces".to_string();
    assert!(matches!(bus.subscribe(bad_name).await, Err(BusError::Config(_))));
    let mut no_buffer = options("durable", ">");
    no_buffer.buffer = 0;
    assert!(matches!(bus.subscribe(no_buffer).await, Err(BusError::Config(_))));
    let mut huge_buffer = options("durable", ">");
    huge_buffer.buffer = tartarus_events::MAX_SUBSCRIPTION_BUFFER + 1;
    assert!(matches!(
        bus.subscribe(huge_buffer).await,
        Err(BusError::Config(_))
    ));
    cleanup(provider, &namespace).await;
}

async fn a_provider_that_is_not_there_is_a_clear_error(provider: Provider) {
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let url = support::via(&support::server_url(provider).expect("a server"), closed);
    let config = tartarus_events::BusConfig::parse(&url).expect("a setting");
    let started = Instant::now();
    let error = match tartarus_events::connect(&config).await {
        Ok(_) => panic!("connected to {closed}, where nothing listens"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let line = error.chain();
    assert!(
        matches!(error, BusError::Unavailable { .. } | BusError::Timeout { .. }),
        "{line}"
    );
    assert!(line.contains(&provider.to_string()), "names the provider: {line}");
    assert!(line.contains(&closed.to_string()), "names the address: {line}");
}

async fn a_provider_that_goes_down_is_retried_with_backoff(provider: Provider) {
    let namespace = fresh_namespace();
    let server = support::server_url(provider).expect("a server");
    let upstream = {
        let parsed = url::Url::parse(&server).expect("a url");
        format!(
            "{}:{}",
            parsed.host_str().expect("a host"),
            parsed.port_or_known_default().unwrap_or(match provider {
                Provider::Postgres => 5432,
                Provider::Nats => 4222,
                _ => 6379,
            })
        )
    };
    let proxy = support::proxy::Proxy::start(upstream).await;
    let bus = support::bus_at(provider, &support::via(&server, proxy.addr), &namespace).await;
    let mut subscription = bus.subscribe(options("survivor", ">")).await.expect("subscribe");
    let publisher = Publisher::spawn(bus.clone(), 100);
    publisher.publish(event("task.created", json!({ "n": 1 })));
    let one = next(&mut subscription, DEADLINE, "the event before the outage").await;
    assert_eq!(one.event.data["n"], 1);
    one.ack().await.expect("ack");

    proxy.cut();
    let direct = bus.publish(&event("task.created", json!({ "n": 0 }))).await;
    let error = direct.expect_err("a publish while the provider is down succeeded");
    assert!(error.chain().contains(&provider.to_string()), "{}", error.chain());
    publisher.publish(event("task.created", json!({ "n": 2 })));
    wait_for(DEADLINE, "the publisher to report the provider down", || {
        let health = publisher.health();
        async move {
            !health.healthy
                && health
                    .last_error
                    .is_some_and(|e| e.contains(&provider.to_string()))
        }
    })
    .await;
    assert_eq!(publisher.health().pending, 1, "the event waits in the outbox");

    proxy.restore();
    wait_for(Duration::from_secs(30), "the publisher to recover", || {
        let health = publisher.health();
        async move { health.healthy && health.published == 2 && health.pending == 0 }
    })
    .await;
    // The subscription reconnected on its own and gets the event published after the outage.
    let started = Instant::now();
    loop {
        let delivery = next(
            &mut subscription,
            Duration::from_secs(30),
            "the event after the outage",
        )
        .await;
        let n = delivery.event.data["n"].as_u64();
        delivery.ack().await.expect("ack after the outage");
        if n == Some(2) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never got event 2");
    }
    assert!(
        subscription.last_error().is_none(),
        "the subscription still reports a failure"
    );
    drop(subscription);
    drop(proxy);
    cleanup(provider, &namespace).await;
}
