//! Placement of one request on one node: the filters, in a fixed order, that decide which nodes could take
//! it, the score that picks among them, and the one-line explanation of the choice (or of the refusal).
//!
//! A pure function of its inputs: no clock, no randomness, no floating point. The same request, nodes and
//! strategy always give the same node, score and text, whatever order the nodes come in.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::node::{Node, NodeState, Taint, TaintEffect};
use crate::request::{LabelTerm, Request, MAX_WEIGHT};
use crate::resources::ResourceKind;

/// The range of the load part of a score: 0 to this (one point is one basis point of free share).
pub const LOAD_SCALE: i64 = 10_000;

/// Score points per unit of affinity or anti-affinity weight: a weight-100 term is worth [`LOAD_SCALE`].
pub const WEIGHT_POINTS: i64 = 100;

/// Score lost for each `PreferNoSchedule` taint the request does not tolerate: such a node is chosen only
/// when no untainted node fits (or affinity outweighs it).
pub const PREFER_NO_SCHEDULE_PENALTY: i64 = 10_000;

/// Score lost, for a request with `spread`, for each reservation of its group already on the node: one
/// replica more on a node outweighs any difference in load.
pub const SPREAD_PENALTY: i64 = 10_000;

/// How to choose among nodes that can take a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The node with the largest share free after placement: spreads load, leaves headroom everywhere.
    #[default]
    LeastLoaded,
    /// The node with the smallest share free after placement: fills nodes up, keeps others empty for large
    /// requests (and for scaling down).
    BinPack,
}

impl Strategy {
    /// `least-loaded` or `bin-pack`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::LeastLoaded => "least-loaded",
            Strategy::BinPack => "bin-pack",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = StrategyError;

    /// `least-loaded` or `bin-pack` (underscores are accepted too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "least-loaded" | "least_loaded" => Ok(Strategy::LeastLoaded),
            "bin-pack" | "bin_pack" => Ok(Strategy::BinPack),
            _ => Err(StrategyError { given: s.to_string() }),
        }
    }
}

/// A strategy name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement strategy {given:?}: expected least-loaded or bin-pack")]
pub struct StrategyError {
    /// What was given.
    pub given: String,
}

/// Why a node was filtered out, one per filter, in the order the filters run. A node gets the first one it
/// fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// 1. State: the node is unreachable.
    Unreachable,
    /// 1. State: the node is draining.
    Draining,
    /// 2. Quarantine: a quarantine node and ordinary work, or an ordinary node and quarantined work.
    Quarantine,
    /// 3. Pool: the node does not serve the request's resource class.
    Pool,
    /// 4. Selector: a label the request selects is missing or different.
    Selector,
    /// 5. Taints: a `NoSchedule` taint the request does not tolerate.
    Taint,
    /// 6. Lane: the node does not run the isolation lane the request names.
    Lane,
    /// 7. Capacity: capacity − allocated is less than the request in some kind.
    Capacity,
}

impl RejectReason {
    /// Every reason, in filter order.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::Unreachable,
        RejectReason::Draining,
        RejectReason::Quarantine,
        RejectReason::Pool,
        RejectReason::Selector,
        RejectReason::Taint,
        RejectReason::Lane,
        RejectReason::Capacity,
    ];

    /// The key in [`Placement::rejected`] and [`Unschedulable::reasons`]: `unreachable`, `draining`,
    /// `quarantine`, `pool`, `selector`, `taint`, `lane` or `capacity`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Unreachable => "unreachable",
            RejectReason::Draining => "draining",
            RejectReason::Quarantine => "quarantine",
            RejectReason::Pool => "pool",
            RejectReason::Selector => "selector",
            RejectReason::Taint => "taint",
            RejectReason::Lane => "lane",
            RejectReason::Capacity => "capacity",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request goes, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The chosen node's id.
    pub node: String,
    /// Its score (see the crate docs for the scale).
    pub score: i64,
    /// One line for people (`tartarus inspect`): the node, strategy, score and its parts, and what
    /// happened to the other nodes.
    pub explanation: String,
    /// How many nodes were looked at.
    pub considered: usize,
    /// How many nodes each filter rejected, by [`RejectReason::as_str`]; reasons that rejected none are
    /// left out.
    pub rejected: BTreeMap<String, usize>,
}

/// No node can take the request now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Unschedulable {
    /// How many nodes each filter rejected, by [`RejectReason::as_str`]; reasons that rejected none are
    /// left out.
    pub reasons: BTreeMap<String, usize>,
    /// No known node could take it even if every node were ready and empty (or there are no nodes): the
    /// caller can fail the request instead of queueing it.
    pub never_fits: bool,
    /// One line for people: `no node fits: 3 lack capacity (cpu), 2 are unreachable`.
    pub message: String,
}

/// Chooses the node for `request` among `nodes`.
///
/// Each node goes through the filters in this order, and a rejected node is counted under the first one
/// it fails ([`RejectReason`]): 1. state is ready; 2. quarantine matches (quarantine nodes take only
/// quarantined work, quarantined work goes only to quarantine nodes); 3. the node serves the request's
/// class; 4. the node has every selected label; 5. the request tolerates every `NoSchedule` taint;
/// 6. the node runs the request's isolation lane, if it names one; 7. capacity − allocated covers the
/// request.
///
/// The nodes that pass are scored by `strategy` plus preferences (see the crate docs); the highest score
/// wins, and the smaller node id breaks ties.
pub fn place(request: &Request, nodes: &[Node], strategy: Strategy) -> Result<Placement, Unschedulable> {
    place_at(request, nodes, strategy).map(|(_, placement)| placement)
}

/// [`place`], also giving the index of the chosen node in `nodes`.
pub(crate) fn place_at(
    request: &Request,
    nodes: &[Node],
    strategy: Strategy,
) -> Result<(usize, Placement), Unschedulable> {
    let quarantined = request.is_quarantined();
    let mut tally = Tally::default();
    let mut best: Option<(usize, Score)> = None;
    let mut survivors = 0usize;
    for (index, node) in nodes.iter().enumerate() {
        if let Some(rejection) = filter(request, quarantined, node) {
            tally.add(rejection);
            continue;
        }
        survivors += 1;
        let score = score(request, node, strategy);
        let better = match &best {
            None => true,
            Some((best_index, best_score)) => {
                score.total > best_score.total
                    || (score.total == best_score.total && node.id < nodes[*best_index].id)
            }
        };
        if better {
            best = Some((index, score));
        }
    }

    let phrases = tally.phrases(request, quarantined);
    match best {
        Some((index, score)) => {
            let node = &nodes[index];
            let mut others = phrases;
            if survivors > 1 {
                others.push(format!("{} scored lower", survivors - 1));
            }
            let placement = Placement {
                node: node.id.clone(),
                score: score.total,
                explanation: explain(request, node, strategy, &score, nodes.len(), &others),
                considered: nodes.len(),
                rejected: tally.reasons(),
            };
            Ok((index, placement))
        }
        None => Err(unschedulable(request, quarantined, nodes, &tally, &phrases)),
    }
}

/// Why a node was filtered out, with what the messages name.
enum Rejection<'a> {
    State(RejectReason),
    Quarantine,
    Pool,
    /// The first selected label the node lacks, as the request states it.
    Selector(&'a str, &'a str),
    /// The first `NoSchedule` taint not tolerated.
    Taint(&'a Taint),
    /// The lane the request names, which the node does not run.
    Lane,
    /// Which kinds are short, in [`ResourceKind::ALL`] order.
    Capacity([bool; 3]),
}

impl Rejection<'_> {
    fn reason(&self) -> RejectReason {
        match self {
            Rejection::State(reason) => *reason,
            Rejection::Quarantine => RejectReason::Quarantine,
            Rejection::Pool => RejectReason::Pool,
            Rejection::Selector(..) => RejectReason::Selector,
            Rejection::Taint(_) => RejectReason::Taint,
            Rejection::Lane => RejectReason::Lane,
            Rejection::Capacity(_) => RejectReason::Capacity,
        }
    }
}

/// All filters, in order.
fn filter<'a>(request: &'a Request, quarantined: bool, node: &'a Node) -> Option<Rejection<'a>> {
    match node.state {
        NodeState::Ready => {}
        NodeState::Unreachable => return Some(Rejection::State(RejectReason::Unreachable)),
        NodeState::Draining => return Some(Rejection::State(RejectReason::Draining)),
    }
    if let Some(rejection) = configuration_filter(request, quarantined, node) {
        return Some(rejection);
    }
    let free = node.free();
    if request.resources.fits_in(free) {
        return None;
    }
    let mut lacking = [false; 3];
    for kind in request.resources.exceeding(free) {
        lacking[kind as usize] = true;
    }
    Some(Rejection::Capacity(lacking))
}

/// The filters that depend only on how the node is configured (2 to 6), not on its state or load: a node
/// that fails one of them could not take the request even when ready and empty.
fn configuration_filter<'a>(
    request: &'a Request,
    quarantined: bool,
    node: &'a Node,
) -> Option<Rejection<'a>> {
    if node.quarantine != quarantined {
        return Some(Rejection::Quarantine);
    }
    if !node.serves(request.class.as_deref()) {
        return Some(Rejection::Pool);
    }
    for (key, value) in &request.selector {
        if node.labels.get(key) != Some(value) {
            return Some(Rejection::Selector(key, value));
        }
    }
    if let Some(taint) = node
        .taints
        .iter()
        .find(|taint| taint.effect == TaintEffect::NoSchedule && !taint.tolerated_by(&request.tolerations))
    {
        return Some(Rejection::Taint(taint));
    }
    match &request.lane {
        Some(lane) if !node.runs(lane) => Some(Rejection::Lane),
        _ => None,
    }
}

/// A node's score and its parts.
struct Score {
    total: i64,
    /// The strategy's part, 0 to [`LOAD_SCALE`].
    load: i64,
    /// Free share of each kind after placement, in basis points.
    free_after: [u64; 3],
    affinity: i64,
    taint_penalty: i64,
    spread_penalty: i64,
}

/// Scores a node that passed the filters.
///
/// The load part is the mean free share after placement over CPU and memory (and GPUs when the request
/// asks for some), in basis points: least-loaded takes it as is, bin-pack takes [`LOAD_SCALE`] minus it.
fn score(request: &Request, node: &Node, strategy: Strategy) -> Score {
    let free = node.free();
    let mut free_after = [0u64; 3];
    let (mut sum, mut counted) = (0u64, 0u64);
    for kind in ResourceKind::ALL {
        let capacity = node.capacity.get(kind);
        let after = free.get(kind).saturating_sub(request.resources.get(kind));
        // after ≤ free ≤ capacity, so the share is at most LOAD_SCALE.
        let share = match capacity {
            0 => 0,
            _ => u64::try_from(u128::from(after) * 10_000 / u128::from(capacity)).unwrap_or(10_000),
        };
        free_after[kind as usize] = share;
        if kind != ResourceKind::Gpus || request.resources.gpus > 0 {
            sum += share;
            counted += 1;
        }
    }
    let mean = i64::try_from(sum / counted.max(1)).unwrap_or(LOAD_SCALE);
    let load = match strategy {
        Strategy::LeastLoaded => mean,
        Strategy::BinPack => LOAD_SCALE - mean,
    };

    let weight = |terms: &[LabelTerm]| -> i64 {
        terms
            .iter()
            .filter(|term| term.matches(&node.labels))
            .map(|term| i64::from(term.weight.min(MAX_WEIGHT)) * WEIGHT_POINTS)
            .fold(0i64, i64::saturating_add)
    };
    let affinity = weight(&request.affinity).saturating_sub(weight(&request.anti_affinity));
    let untolerated = node
        .taints
        .iter()
        .filter(|taint| {
            taint.effect == TaintEffect::PreferNoSchedule && !taint.tolerated_by(&request.tolerations)
        })
        .count();
    let taint_penalty = i64::try_from(untolerated)
        .unwrap_or(i64::MAX)
        .saturating_mul(PREFER_NO_SCHEDULE_PENALTY);
    let spread_penalty = match &request.group {
        Some(group) if request.spread => i64::from(node.group_count(group)) * SPREAD_PENALTY,
        _ => 0,
    };
    Score {
        total: load
            .saturating_add(affinity)
            .saturating_sub(taint_penalty)
            .saturating_sub(spread_penalty),
        load,
        free_after,
        affinity,
        taint_penalty,
        spread_penalty,
    }
}

/// `node-7: least-loaded score 8412 (cpu 62% free, memory 71% free after placement); 100 nodes: …`.
fn explain(
    request: &Request,
    node: &Node,
    strategy: Strategy,
    score: &Score,
    considered: usize,
    others: &[String],
) -> String {
    let mut shares: Vec<String> = Vec::with_capacity(3);
    for kind in ResourceKind::ALL {
        if kind != ResourceKind::Gpus || request.resources.gpus > 0 {
            shares.push(format!("{kind} {}% free", score.free_after[kind as usize] / 100));
        }
    }
    let mut parts = vec![format!("{} after placement", shares.join(", "))];
    if score.affinity != 0 {
        parts.push(format!("affinity {:+}", score.affinity));
    }
    if score.taint_penalty != 0 {
        parts.push(format!("prefer-no-schedule taint -{}", score.taint_penalty));
    }
    if score.spread_penalty != 0 {
        if let Some(group) = &request.group {
            let count = node.group_count(group);
            parts.push(format!(
                "spread -{} ({count} of group {group} here)",
                score.spread_penalty
            ));
        }
    }
    if parts.len() > 1 {
        parts[0] = format!("load {}: {}", score.load, parts[0]);
    }
    let nodes = match others {
        [] => format!(
            "{considered} {}, no other candidate",
            plural(considered, "node", "nodes")
        ),
        _ => format!(
            "{considered} {}: {}",
            plural(considered, "node", "nodes"),
            others.join(", ")
        ),
    };
    format!(
        "{}: {strategy} score {} ({}); {nodes}",
        node.id,
        score.total,
        parts.join("; ")
    )
}

/// The error for a request no node can take.
fn unschedulable(
    request: &Request,
    quarantined: bool,
    nodes: &[Node],
    tally: &Tally,
    phrases: &[String],
) -> Unschedulable {
    let mut eligible = nodes
        .iter()
        .filter(|node| configuration_filter(request, quarantined, node).is_none());
    let any_eligible = eligible.clone().next().is_some();
    let never_fits = !eligible.any(|node| request.resources.fits_in(node.capacity));
    let mut message = if nodes.is_empty() {
        "no node fits: the cluster has no nodes".to_string()
    } else {
        format!("no node fits: {}", phrases.join(", "))
    };
    if never_fits && any_eligible {
        message.push_str(&format!(
            "; it needs more than any eligible node has even when empty ({})",
            request.resources
        ));
    } else if never_fits && !nodes.is_empty() {
        message.push_str("; no node could take it even if all were ready and empty");
    }
    Unschedulable {
        reasons: tally.reasons(),
        never_fits,
        message,
    }
}

/// Counts of rejected nodes by reason, with the details the messages name.
#[derive(Default)]
struct Tally<'a> {
    counts: [usize; RejectReason::ALL.len()],
    /// First failing selector label → nodes.
    selectors: Vec<((&'a str, &'a str), usize)>,
    /// First untolerated taint → nodes.
    taints: Vec<(&'a Taint, usize)>,
    /// Short kind → nodes short of it (a node can be short of several).
    capacity: [usize; 3],
}

impl<'a> Tally<'a> {
    fn add(&mut self, rejection: Rejection<'a>) {
        self.counts[rejection.reason() as usize] += 1;
        match rejection {
            Rejection::Selector(key, value) => bump(&mut self.selectors, (key, value), |a, b| a == b),
            Rejection::Taint(taint) => bump(&mut self.taints, taint, |a, b| {
                a.key == b.key && a.value == b.value
            }),
            Rejection::Capacity(lacking) => {
                for (count, short) in self.capacity.iter_mut().zip(lacking) {
                    *count += usize::from(short);
                }
            }
            Rejection::State(_) | Rejection::Quarantine | Rejection::Pool | Rejection::Lane => {}
        }
    }

    fn reasons(&self) -> BTreeMap<String, usize> {
        RejectReason::ALL
            .into_iter()
            .filter(|&reason| self.counts[reason as usize] > 0)
            .map(|reason| (reason.as_str().to_string(), self.counts[reason as usize]))
            .collect()
    }

    /// `3 lack capacity (cpu)`, `2 are unreachable`, …, in filter order.
    fn phrases(&self, request: &Request, quarantined: bool) -> Vec<String> {
        let mut phrases = Vec::new();
        for reason in RejectReason::ALL {
            let n = self.counts[reason as usize];
            if n == 0 {
                continue;
            }
            phrases.push(match reason {
                RejectReason::Unreachable => format!("{n} {} unreachable", plural(n, "is", "are")),
                RejectReason::Draining => format!("{n} {} draining", plural(n, "is", "are")),
                RejectReason::Quarantine if quarantined => {
                    format!(
                        "{n} {}",
                        plural(n, "is not a quarantine node", "are not quarantine nodes")
                    )
                }
                RejectReason::Quarantine => {
                    format!("{n} {} only quarantined work", plural(n, "takes", "take"))
                }
                RejectReason::Pool => match &request.class {
                    Some(class) => format!("{n} {} not serve class {class}", plural(n, "does", "do")),
                    None => format!("{n} {} only named classes", plural(n, "serves", "serve")),
                },
                RejectReason::Selector => {
                    let details = details(self.selectors.iter().map(|((k, v), n)| (format!("{k}={v}"), *n)));
                    format!("{n} {} selector {details}", plural(n, "fails", "fail"))
                }
                RejectReason::Taint => {
                    let details = details(self.taints.iter().map(|(taint, n)| (taint.to_string(), *n)));
                    let taints = plural(self.taints.len(), "taint", "taints");
                    format!("{n} {} untolerated {taints} {details}", plural(n, "has", "have"))
                }
                RejectReason::Lane => {
                    let lane = request.lane.as_deref().unwrap_or_default();
                    format!("{n} {} lane {lane}", plural(n, "lacks", "lack"))
                }
                RejectReason::Capacity => {
                    let kinds: Vec<(String, usize)> = ResourceKind::ALL
                        .into_iter()
                        .zip(self.capacity)
                        .filter(|(_, n)| *n > 0)
                        .map(|(kind, n)| (kind.to_string(), n))
                        .collect();
                    let details = match kinds.as_slice() {
                        [(only, _)] => only.clone(),
                        _ => counted(&kinds),
                    };
                    format!("{n} {} capacity ({details})", plural(n, "lacks", "lack"))
                }
            });
        }
        phrases
    }
}

/// Adds one to `item`'s count.
fn bump<T: Copy>(counts: &mut Vec<(T, usize)>, item: T, same: impl Fn(&T, &T) -> bool) {
    match counts.iter_mut().find(|(seen, _)| same(seen, &item)) {
        Some((_, count)) => *count += 1,
        None => counts.push((item, 1)),
    }
}

/// `zone=eu` for one item; `(zone=eu 3, disk=ssd 2)` for several.
fn details(items: impl Iterator<Item = (String, usize)>) -> String {
    let items: Vec<(String, usize)> = items.collect();
    match items.as_slice() {
        [(only, _)] => only.clone(),
        _ => format!("({})", counted(&items)),
    }
}

/// `cpu 3, memory 2`.
fn counted(items: &[(String, usize)]) -> String {
    let listed: Vec<String> = items.iter().map(|(item, n)| format!("{item} {n}")).collect();
    listed.join(", ")
}

fn plural<'s>(n: usize, one: &'s str, many: &'s str) -> &'s str {
    if n == 1 {
        one
    } else {
        many
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_strategy_parses_its_names_and_refuses_others_clearly() {
        assert_eq!("least-loaded".parse::<Strategy>(), Ok(Strategy::LeastLoaded));
        assert_eq!("bin_pack".parse::<Strategy>(), Ok(Strategy::BinPack));
        for strategy in [Strategy::LeastLoaded, Strategy::BinPack] {
            assert_eq!(strategy.to_string().parse::<Strategy>(), Ok(strategy));
        }
        let err = "spread".parse::<Strategy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown placement strategy \"spread\": expected least-loaded or bin-pack"
        );
        assert_eq!(serde_json::to_string(&Strategy::BinPack).unwrap(), "\"bin-pack\"");
    }

    #[test]
    fn test_reason_keys_are_in_filter_order() {
        let keys: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            keys,
            [
                "unreachable",
                "draining",
                "quarantine",
                "pool",
                "selector",
                "taint",
                "lane",
                "capacity"
            ]
        );
        for reason in RejectReason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{reason}\""));
        }
    }

    #[test]
    fn test_details_lists_counts_only_when_several() {
        assert_eq!(details([("zone=eu".to_string(), 3)].into_iter()), "zone=eu");
        assert_eq!(
            details([("zone=eu".to_string(), 3), ("disk=ssd".to_string(), 1)].into_iter()),
            "(zone=eu 3, disk=ssd 1)"
        );
    }
}
