//! `Cluster`: reservations and their accounting, node changes, and a long random sequence that must never
//! over-commit a node.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;

use tartarus_scheduler::*;

const GIB: u64 = 1 << 30;

fn node(id: &str) -> Node {
    Node::new(id, Resources::new(4000, 16 * GIB, 0)).unwrap()
}

fn request(id: &str, cpu_millis: u64) -> Request {
    Request::new(id, Resources::new(cpu_millis, GIB, 0))
}

fn reserve(cluster: &mut Cluster, request: &Request) -> Reservation {
    cluster
        .reserve(request, Strategy::LeastLoaded)
        .unwrap_or_else(|e| panic!("{e}"))
        .reservation
}

#[test]
fn test_reserve_adds_to_allocated_and_release_takes_it_back_once() {
    let mut cluster = Cluster::new([node("a"), node("b")]).unwrap();
    let reserved = cluster
        .reserve(&request("r1", 1500).in_group("web", true), Strategy::LeastLoaded)
        .unwrap();
    assert_eq!(reserved.reservation.node, "a", "tie: the smaller id");
    assert_eq!(reserved.placement.node, "a");
    assert!(
        reserved
            .placement
            .explanation
            .starts_with("a: least-loaded score"),
        "{}",
        reserved.placement.explanation
    );
    let a = cluster.node("a").unwrap();
    assert_eq!(a.allocated, Resources::new(1500, GIB, 0));
    assert_eq!(a.group_count("web"), 1);

    assert_eq!(
        reserve(&mut cluster, &request("r2", 1000).in_group("web", true)).node,
        "b",
        "spread and load"
    );
    assert_eq!(cluster.reservations_on("a").len(), 1);
    assert_eq!(cluster.reservation("r2").map(|r| r.node.as_str()), Some("b"));

    let released = cluster.release("r1").unwrap();
    assert_eq!(released.resources, Resources::new(1500, GIB, 0));
    assert_eq!(cluster.node("a").unwrap().allocated, Resources::ZERO);
    assert!(
        cluster.node("a").unwrap().groups.is_empty(),
        "the group count goes with the last replica"
    );
    assert_eq!(cluster.release("r1"), None, "releasing twice is harmless");
    assert_eq!(cluster.release("never"), None);
    assert_eq!(cluster.node("a").unwrap().allocated, Resources::ZERO);
    assert_eq!(cluster.node("b").unwrap().allocated, Resources::new(1000, GIB, 0));
}

#[test]
fn test_reserve_refuses_a_request_id_that_already_holds_a_reservation() {
    let mut cluster = Cluster::new([node("a"), node("b")]).unwrap();
    reserve(&mut cluster, &request("r1", 1000));
    let before: Vec<Node> = cluster.nodes().to_vec();
    let err = cluster
        .reserve(&request("r1", 1000), Strategy::BinPack)
        .unwrap_err();
    assert_eq!(
        err,
        ReserveError::AlreadyReserved {
            request_id: "r1".into(),
            node: "a".into()
        }
    );
    assert_eq!(err.to_string(), "request r1 is already reserved on node a");
    assert_eq!(cluster.nodes(), &before[..], "nothing changed");
    assert_eq!(cluster.reservations().count(), 1);
}

#[test]
fn test_reserve_refuses_invalid_requests_and_changes_nothing_when_unschedulable() {
    let mut cluster = Cluster::new([node("a")]).unwrap();
    let err = cluster
        .reserve(&request("", 1000), Strategy::LeastLoaded)
        .unwrap_err();
    assert!(matches!(err, ReserveError::InvalidRequest(_)), "{err}");
    let err = cluster
        .reserve(&request("big", 5000), Strategy::LeastLoaded)
        .unwrap_err();
    let ReserveError::Unschedulable(unschedulable) = err else {
        panic!("{err}")
    };
    assert!(unschedulable.never_fits);
    assert_eq!(cluster.reservations().count(), 0);
    assert_eq!(cluster.node("a").unwrap().allocated, Resources::ZERO);
}

#[test]
fn test_the_last_free_core_goes_to_one_request_only() {
    let mut cluster = Cluster::new([node("a")]).unwrap();
    for i in 0..4 {
        reserve(&mut cluster, &request(&format!("r{i}"), 1000));
    }
    let err = cluster
        .reserve(&request("r4", 1000), Strategy::LeastLoaded)
        .unwrap_err();
    let ReserveError::Unschedulable(unschedulable) = err else {
        panic!("{err}")
    };
    assert!(!unschedulable.never_fits, "full, not too large");
    assert_eq!(unschedulable.message, "no node fits: 1 lacks capacity (cpu)");
    cluster.release("r2");
    assert_eq!(reserve(&mut cluster, &request("r4", 1000)).node, "a");
}

#[test]
fn test_mark_stops_and_resumes_placement() {
    let mut cluster = Cluster::new([node("a"), node("b")]).unwrap();
    cluster.mark("a", NodeState::Draining).unwrap();
    assert_eq!(reserve(&mut cluster, &request("r1", 1000)).node, "b");
    cluster.mark("b", NodeState::Unreachable).unwrap();
    let err = cluster
        .reserve(&request("r2", 1000), Strategy::LeastLoaded)
        .unwrap_err();
    assert_eq!(err.to_string(), "no node fits: 1 is unreachable, 1 is draining");
    cluster.mark("a", NodeState::Ready).unwrap();
    assert_eq!(reserve(&mut cluster, &request("r2", 1000)).node, "a");
    assert_eq!(
        cluster.mark("zz", NodeState::Ready),
        Err(ClusterError::UnknownNode { node: "zz".into() })
    );
}

#[test]
fn test_upsert_keeps_the_reservations_of_a_changed_node() {
    let mut cluster = Cluster::new([node("a")]).unwrap();
    reserve(&mut cluster, &request("r1", 1000).in_group("web", false));
    // The agent reports new labels and more capacity, and some usage of its own.
    let report = Node::new("a", Resources::new(8000, 32 * GIB, 0))
        .unwrap()
        .with_label("zone", "eu")
        .with_allocated(Resources::new(500, 0, 0));
    cluster.upsert_node(report).unwrap();
    let a = cluster.node("a").unwrap();
    assert_eq!(
        a.allocated,
        Resources::new(1500, GIB, 0),
        "own usage plus the reservation"
    );
    assert_eq!(a.group_count("web"), 1);
    assert_eq!(a.labels.get("zone").map(String::as_str), Some("eu"));
    cluster.release("r1");
    assert_eq!(cluster.node("a").unwrap().allocated, Resources::new(500, 0, 0));

    cluster.upsert_node(node("b")).unwrap();
    assert_eq!(
        cluster.nodes().iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let err = cluster
        .upsert_node(Node {
            capacity: Resources::ZERO,
            ..node("c")
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "node c: capacity has no cpu");
    assert!(cluster.node("c").is_none());
}

#[test]
fn test_a_node_that_shrank_below_its_reservations_takes_nothing_new() {
    let mut cluster = Cluster::new([node("a")]).unwrap();
    reserve(&mut cluster, &request("r1", 3000));
    cluster
        .upsert_node(Node::new("a", Resources::new(2000, 16 * GIB, 0)).unwrap())
        .unwrap();
    let a = cluster.node("a").unwrap();
    assert_eq!(a.allocated.cpu_millis, 3000);
    assert_eq!(a.free().cpu_millis, 0);
    assert!(cluster.reserve(&request("r2", 1), Strategy::LeastLoaded).is_err());
    cluster.release("r1");
    assert_eq!(reserve(&mut cluster, &request("r2", 2000)).node, "a");
}

#[test]
fn test_remove_node_hands_back_its_reservations() {
    let mut cluster = Cluster::new([node("a"), node("b")]).unwrap();
    reserve(&mut cluster, &request("r1", 1000));
    reserve(&mut cluster, &request("r2", 1000));
    reserve(&mut cluster, &request("r3", 1000));
    let removed = cluster.remove_node("a").unwrap();
    assert_eq!(removed.node.id, "a");
    let ids: Vec<_> = removed
        .reservations
        .iter()
        .map(|r| r.request_id.as_str())
        .collect();
    assert_eq!(ids, ["r1", "r3"]);
    assert_eq!(cluster.release("r1"), None, "gone with its node");
    assert_eq!(cluster.reservations().count(), 1);
    assert!(cluster.reservations_on("a").is_empty());
    assert!(cluster.remove_node("a").is_none());
}

#[test]
fn test_restore_rebuilds_accounting_after_a_restart() {
    let mut before = Cluster::new([node("a"), node("b")]).unwrap();
    for i in 0..5 {
        reserve(&mut before, &request(&format!("r{i}"), 500).in_group("web", true));
    }
    let stored = serde_json::to_string(&before.reservations().collect::<Vec<_>>()).unwrap();

    let mut after = Cluster::new([node("a"), node("b")]).unwrap();
    for reservation in serde_json::from_str::<Vec<Reservation>>(&stored).unwrap() {
        after.restore(reservation).unwrap();
    }
    assert_eq!(after.nodes(), before.nodes());
    let again = before.reservation("r0").unwrap().clone();
    assert!(matches!(
        after.restore(again),
        Err(ClusterError::AlreadyReserved { .. })
    ));
    let stray = Reservation {
        request_id: "x".into(),
        node: "zz".into(),
        resources: Resources::ZERO,
        group: None,
    };
    assert_eq!(
        after.restore(stray),
        Err(ClusterError::UnknownNode { node: "zz".into() })
    );
}

#[test]
fn test_new_refuses_invalid_and_repeated_nodes() {
    let err = Cluster::new([node("a"), node("a")]).unwrap_err();
    assert_eq!(err.to_string(), "node a is listed twice");
    let over = node("b").with_allocated(Resources::new(5000, 0, 0));
    let err = Cluster::new([node("a"), over]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "node b: allocated cpu 5000m exceeds its capacity 4000m"
    );
}

/// Numerical Recipes' 64-bit LCG: deterministic, no dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Checks every node against the reservations: allocated = own usage + reservations, never above
/// capacity, group counts equal to the reservations of each group.
fn check_accounting(cluster: &Cluster, base: &BTreeMap<String, Resources>) {
    for node in cluster.nodes() {
        let held = cluster.reservations_on(&node.id);
        let mut sum = base[&node.id];
        let mut groups: BTreeMap<String, u32> = BTreeMap::new();
        for reservation in &held {
            assert_eq!(reservation.node, node.id);
            sum = sum.checked_add(reservation.resources).unwrap();
            if let Some(group) = &reservation.group {
                *groups.entry(group.clone()).or_default() += 1;
            }
        }
        assert_eq!(node.allocated, sum, "node {}", node.id);
        assert!(
            node.allocated.fits_in(node.capacity),
            "node {} over-committed: {:?}",
            node.id,
            node
        );
        assert_eq!(node.groups, groups, "node {}", node.id);
    }
}

#[test]
fn test_random_reserve_and_release_never_exceeds_capacity() {
    for seed in [1u64, 7, 42, 2024] {
        let mut rng = Lcg(seed);
        let mut nodes = Vec::new();
        let mut base = BTreeMap::new();
        for i in 0..12 {
            let capacity = Resources::new(
                1000 * (2 + rng.below(15)),
                GIB * (2 + rng.below(60)),
                rng.below(3) as u32,
            );
            let own = Resources::new(rng.below(1000), rng.below(GIB), 0);
            let mut node = Node::new(format!("n{i:02}"), capacity)
                .unwrap()
                .with_allocated(own);
            if i % 5 == 0 {
                node = node.with_label("zone", "eu");
            }
            if i % 6 == 1 {
                node = node.with_taint(Taint::new("gpu", "true", TaintEffect::NoSchedule));
            }
            if i == 11 {
                node = node.with_quarantine(true);
            }
            base.insert(node.id.clone(), own);
            nodes.push(node);
        }
        let mut cluster = Cluster::new(nodes).unwrap();
        let mut live: Vec<String> = Vec::new();
        let (mut placed, mut refused) = (0, 0);
        for step in 0..5000u64 {
            if rng.below(100) < 55 || live.is_empty() {
                let resources = Resources::new(
                    100 * (1 + rng.below(40)),
                    (GIB / 4) * (1 + rng.below(24)),
                    (rng.below(10) == 0) as u32,
                );
                let mut request = Request::new(format!("s{seed}-{step}"), resources);
                if rng.below(4) == 0 {
                    request = request.with_selector("zone", "eu");
                }
                if rng.below(3) == 0 {
                    request = request.with_toleration(Toleration::any_value("gpu"));
                }
                if rng.below(20) == 0 {
                    request = request.with_quarantined(true);
                }
                if rng.below(2) == 0 {
                    request = request.in_group(format!("g{}", rng.below(4)), rng.below(2) == 0);
                }
                let strategy = if rng.below(2) == 0 {
                    Strategy::LeastLoaded
                } else {
                    Strategy::BinPack
                };
                match cluster.reserve(&request, strategy) {
                    Ok(reserved) => {
                        placed += 1;
                        live.push(reserved.reservation.request_id);
                    }
                    Err(ReserveError::Unschedulable(_)) => refused += 1,
                    Err(e) => panic!("{e}"),
                }
            } else {
                let index = rng.below(live.len() as u64) as usize;
                let id = live.swap_remove(index);
                assert!(cluster.release(&id).is_some());
                assert!(cluster.release(&id).is_none());
            }
            if step % 7 == 0 {
                let id = format!("n{:02}", rng.below(12));
                let state = [
                    NodeState::Ready,
                    NodeState::Ready,
                    NodeState::Draining,
                    NodeState::Unreachable,
                ][rng.below(4) as usize];
                cluster.mark(&id, state).unwrap();
            }
            check_accounting(&cluster, &base);
        }
        assert!(
            placed > 1000 && refused > 0,
            "the sequence exercised both outcomes: {placed} {refused}"
        );
        for id in live.drain(..) {
            cluster.release(&id).unwrap();
        }
        for node in cluster.nodes() {
            assert_eq!(
                node.allocated, base[&node.id],
                "everything given back on {}",
                node.id
            );
            assert!(node.groups.is_empty());
        }
    }
}
