//! The in-memory provider: one process (a single-box server, tests). A bounded log of recent events and one
//! acknowledged position per consumer; events survive subscribers, not the process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, watch};

use crate::subscription::{Acker, PumpStatus};
use crate::{BusError, Delivery, Event, EventBus, Provider, SubscribeOptions, Subscription};

/// Events read from the log per pass of a pump.
const BATCH: usize = 64;

pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// The sequence number of the newest event, for pumps waiting for more.
    newest: watch::Sender<u64>,
}

struct State {
    /// (sequence number, event), oldest first, at most `retention`.
    log: VecDeque<(u64, Event)>,
    newest: u64,
    retention: usize,
    /// Each consumer's acknowledged position.
    acked: HashMap<String, u64>,
}

impl MemoryBus {
    /// A bus keeping the newest `retention` events for consumers that are behind.
    pub fn new(retention: usize) -> MemoryBus {
        MemoryBus {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    log: VecDeque::new(),
                    newest: 0,
                    retention: retention.max(1),
                    acked: HashMap::new(),
                }),
                newest: watch::Sender::new(0),
            }),
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the log consistent (every change is one push or one
        // insert), so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait::async_trait]
impl EventBus for MemoryBus {
    fn provider(&self) -> Provider {
        Provider::Memory
    }

    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        event.encode()?;
        let newest = {
            let mut state = self.inner.state();
            state.newest += 1;
            let seq = state.newest;
            state.log.push_back((seq, event.clone()));
            while state.log.len() > state.retention {
                state.log.pop_front();
            }
            seq
        };
        self.inner.newest.send_replace(newest);
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BusError> {
        options.validate()?;
        let start = {
            let mut state = self.inner.state();
            let newest = state.newest;
            *state.acked.entry(options.consumer.clone()).or_insert(newest)
        };
        let (sender, receiver) = mpsc::channel(options.buffer);
        let pump = tokio::spawn(pump(self.inner.clone(), options, start, sender));
        Ok(Subscription::new(receiver, pump, PumpStatus::default()))
    }
}

async fn pump(
    inner: Arc<Inner>,
    options: SubscribeOptions,
    mut position: u64,
    sender: mpsc::Sender<Delivery>,
) {
    let mut newest = inner.newest.subscribe();
    loop {
        let batch: Vec<(u64, Event)> = {
            let state = inner.state();
            if let Some((oldest, _)) = state.log.front() {
                if *oldest > position + 1 {
                    tracing::warn!(
                        consumer = %options.consumer,
                        lost = *oldest - position - 1,
                        "event bus: a consumer fell behind the in-memory retention; events were dropped"
                    );
                }
            }
            state
                .log
                .iter()
                .filter(|(seq, _)| *seq > position)
                .take(BATCH)
                .cloned()
                .collect()
        };
        if batch.is_empty() {
            // Marks the current value seen, then waits for a newer one.
            newest.borrow_and_update();
            let caught_up = inner.state().newest <= position;
            if caught_up && newest.changed().await.is_err() {
                return;
            }
            continue;
        }
        for (seq, event) in batch {
            position = seq;
            if !options.filter.matches(&event.subject) {
                continue;
            }
            let acker = Acker::Memory(MemoryAck {
                inner: inner.clone(),
                consumer: options.consumer.clone(),
                seq,
            });
            if sender.send(Delivery { event, acker }).await.is_err() {
                return;
            }
        }
    }
}

pub(crate) struct MemoryAck {
    inner: Arc<Inner>,
    consumer: String,
    seq: u64,
}

impl MemoryAck {
    pub(crate) fn ack(self) {
        let mut state = self.inner.state();
        let acked = state.acked.entry(self.consumer).or_insert(0);
        *acked = (*acked).max(self.seq);
    }
}
