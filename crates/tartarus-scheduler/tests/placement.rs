//! `place`: each filter and its reason, the strategies, preferences, tie-breaks, and what the refusal says.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;

use tartarus_scheduler::*;

const GIB: u64 = 1 << 30;

/// A ready 8-core, 32 GiB node with nothing allocated.
fn node(id: &str) -> Node {
    Node::new(id, Resources::new(8000, 32 * GIB, 0)).unwrap()
}

/// One core, 1 GiB.
fn small(id: &str) -> Request {
    Request::new(id, Resources::new(1000, GIB, 0))
}

fn reasons(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

fn chosen(request: &Request, nodes: &[Node], strategy: Strategy) -> String {
    place(request, nodes, strategy)
        .unwrap_or_else(|e| panic!("{e}"))
        .node
}

#[test]
fn test_each_filter_rejects_with_its_reason() {
    let request = small("r")
        .with_class("flame")
        .with_selector("zone", "eu")
        .with_lane("gvisor");
    let eu = |id: &str| node(id).with_label("zone", "eu").with_lane("gvisor");
    let nodes = [
        eu("a-unreachable").with_state(NodeState::Unreachable),
        eu("b-draining").with_state(NodeState::Draining),
        eu("c-quarantine").with_quarantine(true),
        eu("d-pool").with_pool("inferno"),
        node("e-selector").with_label("zone", "us").with_lane("gvisor"),
        eu("f-taint").with_taint(Taint::new("gpu", "true", TaintEffect::NoSchedule)),
        node("g-lane").with_label("zone", "eu").with_lane("process"),
        eu("h-capacity").with_allocated(Resources::new(7500, GIB, 0)),
        eu("i-fits"),
    ];
    let placement = place(&request, &nodes, Strategy::LeastLoaded).unwrap();
    assert_eq!(placement.node, "i-fits");
    assert_eq!(placement.considered, 9);
    let expected: Vec<_> = RejectReason::ALL
        .iter()
        .map(|reason| (reason.as_str(), 1))
        .collect();
    assert_eq!(placement.rejected, reasons(&expected));
    assert!(
        placement.explanation.contains("1 lacks lane gvisor"),
        "{}",
        placement.explanation
    );

    let unplaceable = &nodes[..8];
    let err = place(&request, unplaceable, Strategy::LeastLoaded).unwrap_err();
    assert_eq!(err.reasons, reasons(&expected));
    assert_eq!(
        err.message,
        "no node fits: 1 is unreachable, 1 is draining, 1 takes only quarantined work, \
         1 does not serve class flame, 1 fails selector zone=eu, 1 has untolerated taint gpu=true, \
         1 lacks lane gvisor, 1 lacks capacity (cpu)"
    );
    assert!(!err.never_fits, "h-capacity could take it once emptied");
}

#[test]
fn test_a_node_counts_under_the_first_filter_it_fails() {
    // Fails everything: unreachable, quarantine, pool, selector, taint, lane, capacity.
    let worst = node("n")
        .with_state(NodeState::Unreachable)
        .with_quarantine(true)
        .with_pool("inferno")
        .with_taint(Taint::new("gpu", "", TaintEffect::NoSchedule))
        .with_lane("process")
        .with_allocated(Resources::new(8000, 32 * GIB, 0));
    let request = small("r")
        .with_class("flame")
        .with_selector("zone", "eu")
        .with_lane("gvisor");
    let reason_of = |node: &Node| {
        let err = place(&request, std::slice::from_ref(node), Strategy::LeastLoaded).unwrap_err();
        assert_eq!(
            err.reasons.values().sum::<usize>(),
            1,
            "one reason per node: {:?}",
            err.reasons
        );
        err.reasons.into_keys().next().unwrap()
    };
    let mut node = worst;
    assert_eq!(reason_of(&node), "unreachable");
    node.state = NodeState::Ready;
    assert_eq!(reason_of(&node), "quarantine");
    node.quarantine = false;
    assert_eq!(reason_of(&node), "pool");
    node.pools.clear();
    assert_eq!(reason_of(&node), "selector");
    node.labels.insert("zone".into(), "eu".into());
    assert_eq!(reason_of(&node), "taint");
    node.taints.clear();
    assert_eq!(reason_of(&node), "lane");
    node.lanes.insert("gvisor".into());
    assert_eq!(reason_of(&node), "capacity");
    node.allocated = Resources::ZERO;
    assert!(place(&request, &[node], Strategy::LeastLoaded).is_ok());
}

#[test]
fn test_a_request_naming_a_lane_goes_only_to_nodes_that_run_it() {
    let nodes = [
        node("big-process-only")
            .with_lane("process")
            .with_allocated(Resources::ZERO),
        node("busy-both")
            .with_lane("process")
            .with_lane("gvisor")
            .with_allocated(Resources::new(6000, 24 * GIB, 0)),
    ];
    // Least-loaded alone would pick the idle node; the lane keeps the request off it.
    let walled = small("r").with_lane("gvisor");
    let placement = place(&walled, &nodes, Strategy::LeastLoaded).unwrap();
    assert_eq!(placement.node, "busy-both");
    assert_eq!(placement.rejected, reasons(&[("lane", 1)]));
    assert!(
        placement.explanation.ends_with("2 nodes: 1 lacks lane gvisor"),
        "{}",
        placement.explanation
    );
    // The process lane is on both; a request naming no lane ignores lanes altogether.
    assert_eq!(
        chosen(&small("r").with_lane("process"), &nodes, Strategy::LeastLoaded),
        "big-process-only"
    );
    let bare = [node("lists-nothing")];
    assert_eq!(chosen(&small("r"), &bare, Strategy::LeastLoaded), "lists-nothing");
    let err = place(&small("r").with_lane("process"), &bare, Strategy::LeastLoaded).unwrap_err();
    assert_eq!(err.reasons, reasons(&[("lane", 1)]));
}

#[test]
fn test_a_lane_no_node_runs_never_fits_and_says_which_lane() {
    let nodes = [node("a").with_lane("process"), node("b").with_lane("process")];
    let err = place(&small("r").with_lane("gvisor"), &nodes, Strategy::BinPack).unwrap_err();
    assert!(err.never_fits, "no node could ever run it: fail, do not queue");
    assert_eq!(
        err.message,
        "no node fits: 2 lack lane gvisor; no node could take it even if all were ready and empty"
    );
    // A lane only an unreachable node runs may come back: wait for it.
    let nodes = [
        node("a").with_lane("process"),
        node("b").with_lane("gvisor").with_state(NodeState::Unreachable),
    ];
    let err = place(&small("r").with_lane("gvisor"), &nodes, Strategy::BinPack).unwrap_err();
    assert!(!err.never_fits, "{err}");
    assert_eq!(err.reasons, reasons(&[("unreachable", 1), ("lane", 1)]));
}

#[test]
fn test_strategies_pick_different_nodes() {
    let nodes = [
        node("busy").with_allocated(Resources::new(6000, 24 * GIB, 0)),
        node("idle"),
        node("half").with_allocated(Resources::new(4000, 16 * GIB, 0)),
    ];
    let request = small("r");
    assert_eq!(chosen(&request, &nodes, Strategy::LeastLoaded), "idle");
    assert_eq!(chosen(&request, &nodes, Strategy::BinPack), "busy");

    let least = place(&request, &nodes, Strategy::LeastLoaded).unwrap();
    // idle after placement: cpu 7/8 = 87.5%, memory 31/32 = 96.875% → mean 9218 basis points.
    assert_eq!(least.score, 9218);
    assert_eq!(
        least.explanation,
        "idle: least-loaded score 9218 (cpu 87% free, memory 96% free after placement); 3 nodes: 2 scored lower"
    );
    let packed = place(&request, &nodes, Strategy::BinPack).unwrap();
    // busy after placement: cpu 1/8 = 12.5%, memory 7/32 = 21.875% → mean 1718, so 10000 − 1718.
    assert_eq!(packed.score, 8282);
}

#[test]
fn test_gpus_count_in_the_load_only_when_requested() {
    let gpu_node = |id: &str, used: u32| {
        Node::new(id, Resources::new(8000, 32 * GIB, 4))
            .unwrap()
            .with_allocated(Resources::new(0, 0, used))
    };
    let nodes = [gpu_node("g-free", 0), gpu_node("g-used", 3)];
    let gpu_request = Request::new("r", Resources::new(1000, GIB, 1));
    assert_eq!(chosen(&gpu_request, &nodes, Strategy::LeastLoaded), "g-free");
    assert_eq!(chosen(&gpu_request, &nodes, Strategy::BinPack), "g-used");
    let placement = place(&gpu_request, &nodes, Strategy::BinPack).unwrap();
    assert!(
        placement.explanation.contains("gpus 0% free"),
        "{}",
        placement.explanation
    );
    // Without GPUs asked for, both nodes look the same: the id decides.
    assert_eq!(chosen(&small("r"), &nodes, Strategy::BinPack), "g-free");
}

#[test]
fn test_quarantined_work_goes_only_to_quarantine_nodes() {
    let nodes = [node("a-ordinary"), node("b-quarantine").with_quarantine(true)];
    assert_eq!(
        chosen(&small("r").with_quarantined(true), &nodes, Strategy::LeastLoaded),
        "b-quarantine"
    );
    assert_eq!(
        chosen(&small("r").with_class("quarantine"), &nodes, Strategy::BinPack),
        "b-quarantine"
    );

    let err = place(
        &small("r").with_quarantined(true),
        &nodes[..1],
        Strategy::LeastLoaded,
    )
    .unwrap_err();
    assert_eq!(err.reasons, reasons(&[("quarantine", 1)]));
    assert!(
        err.message.contains("1 is not a quarantine node"),
        "{}",
        err.message
    );
    assert!(err.never_fits, "no quarantine node exists at all");
}

#[test]
fn test_quarantine_nodes_take_no_ordinary_work() {
    let nodes = [node("a-quarantine").with_quarantine(true), node("b-ordinary")];
    // The quarantine node is idle and sorts first: it would win on every other ground.
    let busy = [
        nodes[0].clone(),
        nodes[1].clone().with_allocated(Resources::new(7000, 31 * GIB, 0)),
    ];
    assert_eq!(chosen(&small("r"), &busy, Strategy::LeastLoaded), "b-ordinary");
    let err = place(&small("r"), &nodes[..1], Strategy::LeastLoaded).unwrap_err();
    assert!(
        err.message.contains("1 takes only quarantined work"),
        "{}",
        err.message
    );
}

#[test]
fn test_pools_keep_classes_on_their_nodes() {
    let nodes = [node("a-gpu").with_pool("inferno"), node("b-general")];
    let busy_general = [
        nodes[0].clone(),
        nodes[1].clone().with_allocated(Resources::new(6000, 0, 0)),
    ];
    assert_eq!(
        chosen(
            &small("r").with_class("inferno"),
            &busy_general,
            Strategy::LeastLoaded
        ),
        "a-gpu"
    );
    assert_eq!(
        chosen(
            &small("r").with_class("ember"),
            &busy_general,
            Strategy::LeastLoaded
        ),
        "b-general"
    );
    assert_eq!(
        chosen(&small("r"), &busy_general, Strategy::LeastLoaded),
        "b-general"
    );
    let err = place(
        &small("r").with_class("ember"),
        &nodes[..1],
        Strategy::LeastLoaded,
    )
    .unwrap_err();
    assert!(
        err.message.contains("1 does not serve class ember"),
        "{}",
        err.message
    );
    let err = place(&small("r"), &nodes[..1], Strategy::LeastLoaded).unwrap_err();
    assert!(
        err.message.contains("1 serves only named classes"),
        "{}",
        err.message
    );
}

#[test]
fn test_no_schedule_taints_need_a_toleration() {
    let tainted = node("gpu-1").with_taint(Taint::new("gpu", "a100", TaintEffect::NoSchedule));
    let nodes = [tainted];
    assert!(place(&small("r"), &nodes, Strategy::LeastLoaded).is_err());
    let wrong_value = small("r").with_toleration(Toleration::exact("gpu", "h100"));
    let err = place(&wrong_value, &nodes, Strategy::LeastLoaded).unwrap_err();
    assert_eq!(err.reasons, reasons(&[("taint", 1)]));
    assert!(
        err.message.contains("1 has untolerated taint gpu=a100"),
        "{}",
        err.message
    );
    let exact = small("r").with_toleration(Toleration::exact("gpu", "a100"));
    assert_eq!(chosen(&exact, &nodes, Strategy::LeastLoaded), "gpu-1");
    let wildcard = small("r").with_toleration(Toleration::any_value("gpu"));
    assert_eq!(chosen(&wildcard, &nodes, Strategy::LeastLoaded), "gpu-1");
}

#[test]
fn test_prefer_no_schedule_taints_steer_away_but_do_not_exclude() {
    let soft = node("a-soft").with_taint(Taint::new("spot", "true", TaintEffect::PreferNoSchedule));
    let busy = node("b-busy").with_allocated(Resources::new(6000, 24 * GIB, 0));
    let nodes = [soft.clone(), busy];
    assert_eq!(chosen(&small("r"), &nodes, Strategy::LeastLoaded), "b-busy");
    let placement = place(&small("r"), &[soft], Strategy::LeastLoaded).unwrap();
    assert_eq!(placement.node, "a-soft", "still usable when it is the only node");
    assert!(
        placement.explanation.contains("prefer-no-schedule taint -10000"),
        "{}",
        placement.explanation
    );
    let tolerant = small("r").with_toleration(Toleration::any_value("spot"));
    assert_eq!(chosen(&tolerant, &nodes, Strategy::LeastLoaded), "a-soft");
}

#[test]
fn test_selector_needs_every_label() {
    let nodes = [
        node("a").with_label("zone", "eu").with_label("disk", "hdd"),
        node("b").with_label("zone", "us").with_label("disk", "ssd"),
        node("c").with_label("zone", "eu").with_label("disk", "ssd"),
        node("d"),
    ];
    let request = small("r")
        .with_selector("zone", "eu")
        .with_selector("disk", "ssd");
    let placement = place(&request, &nodes, Strategy::LeastLoaded).unwrap();
    assert_eq!(placement.node, "c");
    assert_eq!(placement.rejected, reasons(&[("selector", 3)]));
    // The first failing label in key order: disk for a, zone for b, disk for d.
    assert!(
        placement
            .explanation
            .ends_with("4 nodes: 3 fail selector (disk=ssd 2, zone=eu 1)"),
        "{}",
        placement.explanation
    );
}

#[test]
fn test_affinity_and_anti_affinity_move_the_choice() {
    let nodes = [
        node("a-hdd").with_label("disk", "hdd"),
        node("b-ssd")
            .with_label("disk", "ssd")
            .with_allocated(Resources::new(4000, 16 * GIB, 0)),
    ];
    assert_eq!(chosen(&small("r"), &nodes, Strategy::LeastLoaded), "a-hdd");
    let prefers_ssd = small("r").with_affinity(LabelTerm::new("disk", "ssd", 60));
    let placement = place(&prefers_ssd, &nodes, Strategy::LeastLoaded).unwrap();
    assert_eq!(placement.node, "b-ssd");
    assert!(
        placement.explanation.contains("affinity +6000"),
        "{}",
        placement.explanation
    );
    let avoids_hdd = small("r").with_anti_affinity(LabelTerm::has_key("disk", 100));
    // Both have a disk label: the penalty is equal and load decides again.
    assert_eq!(chosen(&avoids_hdd, &nodes, Strategy::LeastLoaded), "a-hdd");
    let avoids_hdd = small("r").with_anti_affinity(LabelTerm::new("disk", "hdd", 100));
    assert_eq!(chosen(&avoids_hdd, &nodes, Strategy::LeastLoaded), "b-ssd");
}

#[test]
fn test_spread_prefers_nodes_running_fewer_of_the_group() {
    let nodes = [
        node("a").with_group("web", 2),
        node("b")
            .with_group("web", 1)
            .with_allocated(Resources::new(6000, 0, 0)),
        node("c").with_group("web", 1),
    ];
    let replica = small("r").in_group("web", true);
    // c and b run one replica each; c is less loaded. a is idle but already runs two.
    assert_eq!(chosen(&replica, &nodes, Strategy::LeastLoaded), "c");
    // Bin-pack would fill b, and still respects the spread over a.
    assert_eq!(chosen(&replica, &nodes, Strategy::BinPack), "b");
    let placement = place(&replica, &nodes[..1], Strategy::LeastLoaded).unwrap();
    assert!(
        placement
            .explanation
            .contains("spread -20000 (2 of group web here)"),
        "{}",
        placement.explanation
    );
    // Without spread the group does not matter.
    let unspread = small("r").in_group("web", false);
    assert_eq!(chosen(&unspread, &nodes, Strategy::LeastLoaded), "a");
}

#[test]
fn test_ties_go_to_the_smallest_id_whatever_the_order() {
    let mut nodes = vec![node("node-3"), node("node-1"), node("node-2")];
    for _ in 0..3 {
        nodes.rotate_left(1);
        for strategy in [Strategy::LeastLoaded, Strategy::BinPack] {
            assert_eq!(chosen(&small("r"), &nodes, strategy), "node-1");
            let a = place(&small("r"), &nodes, strategy).unwrap();
            let mut reversed = nodes.clone();
            reversed.reverse();
            assert_eq!(
                a,
                place(&small("r"), &reversed, strategy).unwrap(),
                "same record either way"
            );
        }
    }
}

#[test]
fn test_never_fits_only_when_no_eligible_node_is_large_enough() {
    let nodes = [
        node("small-full").with_allocated(Resources::new(8000, 32 * GIB, 0)),
        node("small-down").with_state(NodeState::Unreachable),
        Node::new("large", Resources::new(64000, 256 * GIB, 0))
            .unwrap()
            .with_label("zone", "us"),
    ];
    let medium = Request::new("r", Resources::new(4000, 16 * GIB, 0));
    let err = place(
        &medium.clone().with_selector("zone", "eu"),
        &nodes[1..],
        Strategy::LeastLoaded,
    )
    .unwrap_err();
    assert!(err.never_fits, "no eu node at all");
    assert!(
        err.message
            .ends_with("; no node could take it even if all were ready and empty"),
        "{}",
        err.message
    );

    let err = place(&medium, &nodes[..2], Strategy::LeastLoaded).unwrap_err();
    assert!(!err.never_fits, "merely full or down: worth queueing");
    assert_eq!(
        err.message,
        "no node fits: 1 is unreachable, 1 lacks capacity (cpu 1, memory 1)"
    );

    let huge = Request::new("r", Resources::new(16000, 8 * GIB, 0));
    let err = place(&huge, &nodes[..2], Strategy::LeastLoaded).unwrap_err();
    assert!(err.never_fits, "16 cores on 8-core nodes");
    assert_eq!(
        err.message,
        "no node fits: 1 is unreachable, 1 lacks capacity (cpu 1, memory 1); \
         it needs more than any eligible node has even when empty (cpu 16000m, memory 8 GiB)"
    );
    // The large node (a different zone) could take it: not never.
    assert!(!place(&huge, &nodes, Strategy::LeastLoaded).is_err_and(|e| e.never_fits));

    let err = place(&medium, &[], Strategy::LeastLoaded).unwrap_err();
    assert!(err.never_fits);
    assert_eq!(err.message, "no node fits: the cluster has no nodes");
}

#[test]
fn test_explanation_accounts_for_every_node() {
    let mut nodes = Vec::new();
    for i in 0..10 {
        nodes.push(node(&format!("down-{i}")).with_state(NodeState::Unreachable));
    }
    for i in 0..5 {
        let full = node(&format!("full-{i}")).with_label("zone", "eu");
        nodes.push(full.with_allocated(Resources::new(8000, 0, 0)));
    }
    for i in 0..4 {
        nodes.push(node(&format!("us-{i}")).with_label("zone", "us"));
    }
    for i in 0..6 {
        let used = Resources::new(1000 * i, GIB * i, 0);
        nodes.push(
            node(&format!("eu-{i}"))
                .with_label("zone", "eu")
                .with_allocated(used),
        );
    }
    let request = small("r").with_selector("zone", "eu");
    let placement = place(&request, &nodes, Strategy::LeastLoaded).unwrap();
    assert_eq!(placement.node, "eu-0");
    assert_eq!(placement.considered, 25);
    assert_eq!(
        placement.explanation,
        "eu-0: least-loaded score 9218 (cpu 87% free, memory 96% free after placement); \
         25 nodes: 10 are unreachable, 4 fail selector zone=eu, 5 lack capacity (cpu), 5 scored lower"
    );
    assert_eq!(
        placement.rejected,
        reasons(&[("unreachable", 10), ("selector", 4), ("capacity", 5)])
    );
}

#[test]
fn test_over_committed_nodes_take_nothing_and_do_not_panic() {
    // Not valid (allocated > capacity), but place must cope: the server may hand it odd data.
    let odd = Node {
        allocated: Resources::new(9000, 40 * GIB, 0),
        ..node("odd")
    };
    let zero = Node {
        capacity: Resources::ZERO,
        ..node("zero")
    };
    let err = place(&small("r"), &[odd.clone(), zero.clone()], Strategy::BinPack).unwrap_err();
    assert_eq!(err.reasons, reasons(&[("capacity", 2)]));
    // A request for nothing fits anywhere, and the shares are computed without dividing by zero.
    let nothing = Request::new("r", Resources::ZERO);
    assert_eq!(chosen(&nothing, &[odd, zero], Strategy::LeastLoaded), "odd");
}

#[test]
fn test_records_round_trip_as_json() {
    let node = node("n1")
        .with_label("zone", "eu")
        .with_taint(Taint::new("gpu", "true", TaintEffect::PreferNoSchedule))
        .with_pool("blaze")
        .with_group("web", 2);
    let json = serde_json::to_string(&node).unwrap();
    assert!(
        json.contains("\"effect\":\"prefer_no_schedule\"") && json.contains("\"state\":\"ready\""),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Node>(&json).unwrap(), node);
    let minimal: Node = serde_json::from_str(
        r#"{"id":"n2","capacity":{"cpu_millis":1000,"memory_bytes":1024},"state":"draining"}"#,
    )
    .unwrap();
    assert_eq!(minimal.state, NodeState::Draining);
    assert!(minimal.validate().is_ok());

    let request = small("r")
        .with_class("blaze")
        .with_selector("zone", "eu")
        .with_toleration(Toleration::any_value("gpu"))
        .with_affinity(LabelTerm::new("disk", "ssd", 10))
        .in_group("web", true);
    let json = serde_json::to_string(&request).unwrap();
    assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);

    let placement = place(&request, &[node], Strategy::BinPack).unwrap();
    let json = serde_json::to_string(&placement).unwrap();
    assert_eq!(serde_json::from_str::<Placement>(&json).unwrap(), placement);
    let err = place(&request, &[], Strategy::BinPack).unwrap_err();
    let json = serde_json::to_string(&err).unwrap();
    assert_eq!(serde_json::from_str::<Unschedulable>(&json).unwrap(), err);
}
