//! Which isolation lane (the API's `runtime`) a sandbox runs behind: the policy's `isolation` section and
//! the automatic choice ([`choose_runtime`]).
//!
//! The choice is pure: the caller (the server, a node) says which lanes this host offers and whether each
//! can honour the request; the policy says which lanes the tenant may use and how far it is trusted.
//! Quarantine-class sandboxes and untrusted tenants never land on the process lane while a stronger lane is
//! offered and able to take them; when none is, `auto` runs them on the process lane and its reason says
//! so (a policy that must never do that lists only strong lanes in `isolation.runtimes`). A request that
//! names a lane gets that lane or a refusal, never a downgrade.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tartarus_runtime::lanes::LaneName;

/// `isolation`: the walls a tenant's sandboxes run behind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsolationPolicy {
    /// `standard` (default) or `untrusted`: an untrusted tenant's sandboxes need a strong wall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<Trust>,
    /// Lanes the tenant's sandboxes may run on, never empty (default: every lane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtimes: Option<Vec<LaneName>>,
    /// What a request that names no runtime gets: `auto` (default) or a lane from `runtimes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_runtime: Option<RuntimeChoice>,
}

/// How far a tenant's code is trusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    /// The fastest lane that honours the request (the process lane on most hosts).
    #[default]
    Standard,
    /// Never the process lane while a stronger lane is offered.
    Untrusted,
}

/// A request's (or a policy's default) runtime: a lane by name, or `auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RuntimeChoice {
    /// The policy decides from the request and the tenant ([`choose_runtime`]).
    #[default]
    Auto,
    /// This lane.
    Lane(LaneName),
}

impl fmt::Display for RuntimeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeChoice::Auto => f.write_str("auto"),
            RuntimeChoice::Lane(lane) => lane.fmt(f),
        }
    }
}

/// A runtime name that is neither `auto` nor a lane.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown runtime '{0}': use auto, {lanes}", lanes = lane_list(&LaneName::ALL))]
pub struct UnknownRuntime(pub String);

impl FromStr for RuntimeChoice {
    type Err = UnknownRuntime;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(RuntimeChoice::Auto),
            _ => s
                .parse()
                .map(RuntimeChoice::Lane)
                .map_err(|_| UnknownRuntime(s.to_string())),
        }
    }
}

impl Serialize for RuntimeChoice {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RuntimeChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `isolation`, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveIsolation {
    /// How far the tenant's code is trusted.
    pub trust: Trust,
    /// Lanes the tenant's sandboxes may run on.
    pub runtimes: Vec<LaneName>,
    /// What a request that names no runtime gets.
    pub default_runtime: RuntimeChoice,
}

impl Default for EffectiveIsolation {
    fn default() -> Self {
        EffectiveIsolation {
            trust: Trust::Standard,
            runtimes: LaneName::ALL.to_vec(),
            default_runtime: RuntimeChoice::Auto,
        }
    }
}

impl IsolationPolicy {
    /// No key set.
    pub fn is_empty(&self) -> bool {
        self == &IsolationPolicy::default()
    }

    /// Resolves the merged keys over the defaults.
    pub(crate) fn resolve(self) -> EffectiveIsolation {
        let defaults = EffectiveIsolation::default();
        EffectiveIsolation {
            trust: self.trust.unwrap_or(defaults.trust),
            runtimes: self.runtimes.unwrap_or(defaults.runtimes),
            default_runtime: self.default_runtime.unwrap_or(defaults.default_runtime),
        }
    }

    /// Copies every key `other` sets over this one's.
    pub(crate) fn overlay(&mut self, other: &IsolationPolicy) {
        if other.trust.is_some() {
            self.trust = other.trust;
        }
        if other.runtimes.is_some() {
            self.runtimes.clone_from(&other.runtimes);
        }
        if other.default_runtime.is_some() {
            self.default_runtime = other.default_runtime;
        }
    }

    /// Contradictions within the section: `(key, message)`.
    pub(crate) fn contradiction(&self) -> Option<(&'static str, String)> {
        if let Some(runtimes) = &self.runtimes {
            if runtimes.is_empty() {
                return Some((
                    "runtimes",
                    format!(
                        "isolation.runtimes is empty: list the lanes sandboxes may run on ({})",
                        lane_list(&LaneName::ALL)
                    ),
                ));
            }
            if let Some(RuntimeChoice::Lane(lane)) = self.default_runtime {
                if !runtimes.contains(&lane) {
                    return Some((
                        "default_runtime",
                        format!(
                            "isolation.default_runtime {lane} is not in isolation.runtimes ({}): add it there \
                             or choose auto",
                            lane_list(runtimes)
                        ),
                    ));
                }
            }
        }
        None
    }
}

/// How strong a lane's wall is: how little of the host kernel the sandbox's code reaches directly. The
/// process lane (the host kernel behind seccomp) is the weakest; gVisor's user-space kernel is stronger; a
/// microVM's own guest kernel is the strongest. The Wasm lane's guest makes no system calls at all (it
/// reaches only wasmtime's WASI host), which ranks it with gVisor; but that host and the compiler run in
/// the supervisor's own process, with no second wall behind them.
pub fn wall_strength(lane: LaneName) -> u8 {
    match lane {
        LaneName::Process => 0,
        LaneName::Gvisor => 1,
        LaneName::Wasm => 1,
        // Its own guest kernel: the host kernel sees only the VMM.
        LaneName::Microvm => 2,
    }
}

/// Whether `auto` may pick the lane. Never the Wasm lane: it runs only Wasm programs, and whether a
/// request's command is one cannot be told from the spec (its `command[0]` is a path the caller reads),
/// so a request gets it only by naming it.
fn automatic_lane(lane: LaneName) -> bool {
    lane != LaneName::Wasm
}

/// What one lane of this host can do for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneOffer {
    /// The lane.
    pub lane: LaneName,
    /// Why this host cannot run the lane (`None`: it can).
    pub unavailable: Option<String>,
    /// Why the lane cannot honour this request (`None`: it can), e.g. a knob it lacks.
    pub unsupported: Option<String>,
    /// Why the lane, although it works, is too slow here for `auto` to pick it (`None`: it is not), e.g.
    /// a microVM lane whose guests run under software emulation. A request that names the lane gets it.
    pub emulated: Option<String>,
}

impl LaneOffer {
    fn usable(&self) -> bool {
        self.unavailable.is_none() && self.unsupported.is_none()
    }

    /// Usable, and fast enough here for `auto`.
    fn automatic(&self) -> bool {
        self.usable() && self.emulated.is_none()
    }

    /// Why it cannot take the request, if it cannot.
    fn obstacle(&self) -> Option<&str> {
        self.unavailable.as_deref().or(self.unsupported.as_deref())
    }
}

/// What the policy looks at in the request, besides the runtime it names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IsolationFacts {
    /// The sandbox is of the quarantine class (asked for, or sent there by the classifier).
    pub quarantine: bool,
}

/// The lane a sandbox runs on and why, for the create response, the audit trail and `tartarus inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeDecision {
    /// The lane chosen.
    pub runtime: LaneName,
    /// Why, in a few words: `the quarantine class requires a strong wall`.
    pub reason: String,
}

/// A request no lane of this host may or can take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeRefusal {
    /// The policy does not let the tenant use this lane (403).
    #[error("runtime {lane} is not allowed by the policy (isolation.runtimes: {allowed}): ask for one of those or auto")]
    NotAllowed {
        /// The lane asked for.
        lane: LaneName,
        /// The lanes the policy allows, comma-separated.
        allowed: String,
    },
    /// A weaker lane than the request needs, while a stronger one is offered (403).
    #[error("runtime {lane} is too weak for {why}: {stronger} is available here; ask for it or auto")]
    TooWeak {
        /// The lane asked for.
        lane: LaneName,
        /// What needs the strong wall: `the quarantine class`, `an untrusted tenant`.
        why: &'static str,
        /// The stronger lane offered.
        stronger: LaneName,
    },
    /// The lane cannot run here, or cannot honour this request (422).
    #[error("runtime {lane} cannot take this sandbox: {reason}")]
    Unavailable {
        /// The lane asked for.
        lane: LaneName,
        /// Why it cannot.
        reason: String,
    },
    /// No lane the policy allows can take the request (422).
    #[error("{0}")]
    NoLane(String),
}

impl RuntimeRefusal {
    /// Whether the refusal is the policy's (403) rather than the host's or the request's (422).
    pub fn is_policy(&self) -> bool {
        matches!(
            self,
            RuntimeRefusal::NotAllowed { .. } | RuntimeRefusal::TooWeak { .. }
        )
    }
}

/// Chooses the lane for a request that names `requested` (`None`: the policy's `default_runtime`).
///
/// A named lane must be allowed, offered and able to honour the request, and strong enough for it. `auto`
/// takes the fastest usable lane for standard trust, and the strongest usable lane for the quarantine class
/// or an untrusted tenant — the process lane only when no stronger one can take the request, saying why.
pub fn choose_runtime(
    requested: Option<RuntimeChoice>,
    facts: IsolationFacts,
    policy: &EffectiveIsolation,
    offers: &[LaneOffer],
) -> Result<RuntimeDecision, RuntimeRefusal> {
    let needs_strong = match (facts.quarantine, policy.trust) {
        (true, _) => Some("the quarantine class"),
        (false, Trust::Untrusted) => Some("an untrusted tenant"),
        (false, Trust::Standard) => None,
    };
    let allowed = |lane: LaneName| policy.runtimes.contains(&lane);
    // What `auto` picks from, and the strong lane a weak request is pointed to: an emulated lane would
    // pass every check and make each of those sandboxes take seconds to start.
    let usable: Vec<&LaneOffer> = offers
        .iter()
        .filter(|o| o.automatic() && allowed(o.lane) && automatic_lane(o.lane))
        .collect();
    let strongest = usable
        .iter()
        .copied()
        .filter(|o| wall_strength(o.lane) > 0)
        .max_by_key(|o| wall_strength(o.lane));
    match requested.unwrap_or(policy.default_runtime) {
        RuntimeChoice::Lane(lane) => {
            if !allowed(lane) {
                return Err(RuntimeRefusal::NotAllowed {
                    lane,
                    allowed: lane_list(&policy.runtimes),
                });
            }
            let offer = offers.iter().find(|o| o.lane == lane);
            if let Some(reason) = offer.map_or(Some("this server does not offer it"), LaneOffer::obstacle) {
                return Err(RuntimeRefusal::Unavailable {
                    lane,
                    reason: reason.to_string(),
                });
            }
            if let (Some(why), Some(stronger)) = (needs_strong, strongest) {
                if wall_strength(lane) < wall_strength(stronger.lane) && wall_strength(lane) == 0 {
                    return Err(RuntimeRefusal::TooWeak {
                        lane,
                        why,
                        stronger: stronger.lane,
                    });
                }
            }
            let reason = match requested {
                Some(_) => "asked for by the request".to_string(),
                None => "the policy's isolation.default_runtime".to_string(),
            };
            Ok(RuntimeDecision {
                runtime: lane,
                reason,
            })
        }
        RuntimeChoice::Auto => match needs_strong {
            Some(why) => match (strongest, usable.iter().min_by_key(|o| wall_strength(o.lane))) {
                (Some(offer), _) => Ok(RuntimeDecision {
                    runtime: offer.lane,
                    reason: format!(
                        "{why} requires a strong wall{}",
                        missing_note(offers, offer.lane, &allowed)
                    ),
                }),
                (None, Some(fallback)) => Ok(RuntimeDecision {
                    runtime: fallback.lane,
                    reason: format!(
                        "{why} asks for a strong wall but no stronger lane can take it here ({})",
                        obstacles(offers, &allowed, |lane| wall_strength(lane) > 0
                            && automatic_lane(lane))
                    ),
                }),
                (None, None) => Err(RuntimeRefusal::NoLane(format!(
                    "no lane the policy allows can take this sandbox here: {}",
                    obstacles(offers, &allowed, automatic_lane)
                ))),
            },
            None => match usable.iter().min_by_key(|o| wall_strength(o.lane)) {
                Some(offer) => Ok(RuntimeDecision {
                    runtime: offer.lane,
                    reason: "standard trust: the fastest lane that honours the request".to_string(),
                }),
                None => Err(RuntimeRefusal::NoLane(format!(
                    "no lane the policy allows can take this sandbox here: {}",
                    obstacles(offers, &allowed, automatic_lane)
                ))),
            },
        },
    }
}

/// `; microvm: no KVM on this node` for stronger lanes than `chosen` that could not be used.
fn missing_note(offers: &[LaneOffer], chosen: LaneName, allowed: &dyn Fn(LaneName) -> bool) -> String {
    let notes: Vec<String> = offers
        .iter()
        .filter(|o| {
            wall_strength(o.lane) > wall_strength(chosen) && allowed(o.lane) && automatic_lane(o.lane)
        })
        .filter_map(|o| {
            o.obstacle()
                .or(o.emulated.as_deref())
                .map(|why| format!("{}: {why}", o.lane))
        })
        .collect();
    match notes.is_empty() {
        true => String::new(),
        false => format!("; {}", notes.join("; ")),
    }
}

/// Each candidate lane with why it could not be used.
fn obstacles(
    offers: &[LaneOffer],
    allowed: &dyn Fn(LaneName) -> bool,
    candidate: impl Fn(LaneName) -> bool,
) -> String {
    let mut lines = Vec::new();
    for lane in LaneName::ALL.into_iter().filter(|l| candidate(*l)) {
        let why = match (allowed(lane), offers.iter().find(|o| o.lane == lane)) {
            (false, _) => "not allowed by the policy (isolation.runtimes)".to_string(),
            (true, None) => "not offered by this server".to_string(),
            (true, Some(offer)) => offer
                .obstacle()
                .or(offer.emulated.as_deref())
                .unwrap_or("usable")
                .to_string(),
        };
        lines.push(format!("{lane}: {why}"));
    }
    lines.join("; ")
}

fn lane_list(lanes: &[LaneName]) -> String {
    lanes.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(lane: LaneName, unavailable: Option<&str>) -> LaneOffer {
        LaneOffer {
            lane,
            unavailable: unavailable.map(str::to_string),
            unsupported: None,
            emulated: None,
        }
    }

    #[test]
    fn auto_never_picks_an_emulated_lane_but_a_request_naming_it_gets_it() {
        let policy = EffectiveIsolation::default();
        let mut offers = both();
        offers.push(LaneOffer {
            emulated: Some("guests run under TCG (software emulation)".into()),
            ..offer(LaneName::Microvm, None)
        });
        let quarantined = choose_runtime(None, QUARANTINE, &policy, &offers).unwrap();
        assert_eq!(quarantined.runtime, LaneName::Gvisor);
        assert!(
            quarantined.reason.contains("microvm: guests run under TCG"),
            "{}",
            quarantined.reason
        );
        let named = choose_runtime(
            Some(RuntimeChoice::Lane(LaneName::Microvm)),
            QUARANTINE,
            &policy,
            &offers,
        )
        .unwrap();
        assert_eq!(named.runtime, LaneName::Microvm);
        // Not usable for auto, the emulated lane is not where a weak request is pointed either.
        let only_emulated = vec![offers[0].clone(), offers[2].clone()];
        let weak = choose_runtime(
            Some(RuntimeChoice::Lane(LaneName::Process)),
            QUARANTINE,
            &policy,
            &only_emulated,
        );
        assert_eq!(weak.map(|d| d.runtime), Ok(LaneName::Process));
        // Usable under KVM, it is the strongest.
        offers[2].emulated = None;
        let quarantined = choose_runtime(None, QUARANTINE, &policy, &offers).unwrap();
        assert_eq!(quarantined.runtime, LaneName::Microvm);
    }

    #[test]
    fn auto_never_picks_the_wasm_lane_but_a_request_naming_it_gets_it() {
        let policy = EffectiveIsolation::default();
        let mut offers = both();
        offers.push(offer(LaneName::Wasm, None));
        assert_eq!(
            choose_runtime(None, PLAIN, &policy, &offers).map(|d| d.runtime),
            Ok(LaneName::Process)
        );
        assert_eq!(
            choose_runtime(None, QUARANTINE, &policy, &offers).map(|d| d.runtime),
            Ok(LaneName::Gvisor)
        );
        // With only the process lane and wasm, quarantine falls back to the process lane, not to wasm.
        let without_gvisor = vec![offers[0].clone(), offers[2].clone()];
        let fallback = choose_runtime(None, QUARANTINE, &policy, &without_gvisor).unwrap();
        assert_eq!(fallback.runtime, LaneName::Process, "{}", fallback.reason);
        let only_wasm = vec![offers[2].clone()];
        let refused = choose_runtime(None, PLAIN, &policy, &only_wasm).unwrap_err();
        assert!(matches!(refused, RuntimeRefusal::NoLane(_)), "{refused}");
        let named = choose_runtime(
            Some(RuntimeChoice::Lane(LaneName::Wasm)),
            QUARANTINE,
            &policy,
            &offers,
        )
        .unwrap();
        assert_eq!(named.runtime, LaneName::Wasm);
        assert_eq!(wall_strength(LaneName::Wasm), wall_strength(LaneName::Gvisor));
    }

    fn both() -> Vec<LaneOffer> {
        vec![offer(LaneName::Process, None), offer(LaneName::Gvisor, None)]
    }

    const QUARANTINE: IsolationFacts = IsolationFacts { quarantine: true };
    const PLAIN: IsolationFacts = IsolationFacts { quarantine: false };

    #[test]
    fn auto_takes_the_fastest_lane_for_standard_trust_and_the_strongest_for_quarantine() {
        let policy = EffectiveIsolation::default();
        let plain = choose_runtime(None, PLAIN, &policy, &both()).unwrap();
        assert_eq!(plain.runtime, LaneName::Process);
        let quarantined = choose_runtime(None, QUARANTINE, &policy, &both()).unwrap();
        assert_eq!(quarantined.runtime, LaneName::Gvisor);
        assert!(
            quarantined
                .reason
                .contains("quarantine class requires a strong wall"),
            "{}",
            quarantined.reason
        );
        let untrusted = EffectiveIsolation {
            trust: Trust::Untrusted,
            ..EffectiveIsolation::default()
        };
        let decision = choose_runtime(Some(RuntimeChoice::Auto), PLAIN, &untrusted, &both()).unwrap();
        assert_eq!(decision.runtime, LaneName::Gvisor);
        assert!(
            decision.reason.contains("untrusted tenant"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn quarantine_falls_back_to_the_process_lane_only_when_no_stronger_lane_can_take_it() {
        let offers = vec![
            offer(LaneName::Process, None),
            offer(
                LaneName::Gvisor,
                Some("runsc not found: install the runsc package"),
            ),
        ];
        let fallback = choose_runtime(None, QUARANTINE, &EffectiveIsolation::default(), &offers).unwrap();
        assert_eq!(fallback.runtime, LaneName::Process);
        assert!(
            fallback.reason.contains("gvisor: runsc not found"),
            "{}",
            fallback.reason
        );
        // A policy that lists only strong lanes never falls back.
        let strong_only = EffectiveIsolation {
            runtimes: vec![LaneName::Gvisor],
            ..EffectiveIsolation::default()
        };
        let refused = choose_runtime(None, QUARANTINE, &strong_only, &offers).unwrap_err();
        assert!(!refused.is_policy());
        let text = refused.to_string();
        assert!(text.contains("gvisor: runsc not found"), "{text}");
        assert!(text.contains("process: not allowed by the policy"), "{text}");
        // Asking for the process lane by name while gVisor is offered is refused as too weak.
        let refused = choose_runtime(
            Some(RuntimeChoice::Lane(LaneName::Process)),
            QUARANTINE,
            &EffectiveIsolation::default(),
            &both(),
        )
        .unwrap_err();
        assert!(refused.is_policy());
        assert!(refused.to_string().contains("too weak"), "{refused}");
    }

    #[test]
    fn a_named_lane_must_be_allowed_offered_and_able() {
        let only_process = EffectiveIsolation {
            runtimes: vec![LaneName::Process],
            ..EffectiveIsolation::default()
        };
        let gvisor = Some(RuntimeChoice::Lane(LaneName::Gvisor));
        let refused = choose_runtime(gvisor, PLAIN, &only_process, &both()).unwrap_err();
        assert!(matches!(refused, RuntimeRefusal::NotAllowed { .. }), "{refused}");
        let offers = vec![
            offer(LaneName::Process, None),
            offer(LaneName::Gvisor, Some("no runsc")),
        ];
        let refused = choose_runtime(gvisor, PLAIN, &EffectiveIsolation::default(), &offers).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "runtime gvisor cannot take this sandbox: no runsc"
        );
        let mut offers = both();
        offers[1].unsupported = Some("gvisor cannot share the host's network".into());
        let refused = choose_runtime(gvisor, PLAIN, &EffectiveIsolation::default(), &offers).unwrap_err();
        assert!(
            refused.to_string().contains("share the host's network"),
            "{refused}"
        );
        let chosen = choose_runtime(gvisor, PLAIN, &EffectiveIsolation::default(), &both()).unwrap();
        assert_eq!(chosen.runtime, LaneName::Gvisor);
        assert_eq!(chosen.reason, "asked for by the request");
    }

    #[test]
    fn auto_skips_a_lane_that_cannot_honour_the_request() {
        let mut offers = both();
        offers[0].unsupported = Some("process cannot do X".into());
        let chosen = choose_runtime(None, PLAIN, &EffectiveIsolation::default(), &offers).unwrap();
        assert_eq!(chosen.runtime, LaneName::Gvisor);
        offers[1].unavailable = Some("no runsc".into());
        let refused = choose_runtime(None, PLAIN, &EffectiveIsolation::default(), &offers).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "no lane the policy allows can take this sandbox here: process: process cannot do X; gvisor: no runsc; \
             microvm: not offered by this server"
        );
    }

    #[test]
    fn the_policy_default_runtime_applies_to_requests_naming_none() {
        let policy = EffectiveIsolation {
            default_runtime: RuntimeChoice::Lane(LaneName::Gvisor),
            ..EffectiveIsolation::default()
        };
        let chosen = choose_runtime(None, PLAIN, &policy, &both()).unwrap();
        assert_eq!(chosen.runtime, LaneName::Gvisor);
        assert!(chosen.reason.contains("default_runtime"));
    }

    #[test]
    fn the_section_parses_merges_and_refuses_contradictions() {
        let strict = crate::parse_policy(
            "id: strict\ntenants: [beta]\nisolation: {trust: untrusted, runtimes: [gvisor]}\n",
            "strict.yaml",
        )
        .unwrap();
        let base =
            crate::parse_policy("id: base\nisolation: {default_runtime: process}\n", "base.yaml").unwrap();
        let policies = [base, strict];
        let beta = crate::effective(&policies, "beta", None).isolation;
        assert_eq!(beta.trust, Trust::Untrusted);
        assert_eq!(beta.runtimes, vec![LaneName::Gvisor]);
        assert_eq!(beta.default_runtime, RuntimeChoice::Lane(LaneName::Process));
        let alpha = crate::effective(&policies, "alpha", None).isolation;
        assert_eq!(alpha.trust, Trust::Standard);
        assert_eq!(alpha.runtimes, LaneName::ALL.to_vec());
        for (text, names) in [
            (
                "id: a\nisolation: {runtimes: []}\n",
                "isolation.runtimes is empty",
            ),
            (
                "id: a\nisolation: {runtimes: [gvisor], default_runtime: process}\n",
                "default_runtime process is not in isolation.runtimes",
            ),
            (
                "id: a\nisolation: {default_runtime: docker}\n",
                "unknown runtime 'docker'",
            ),
            ("id: a\nisolation: {trust: maybe}\n", "trust"),
            ("id: a\nisolation: {runtimes: [kvm]}\n", "kvm"),
        ] {
            let error = crate::parse_policy(text, "p.yaml").unwrap_err().to_string();
            assert!(error.contains(names), "{error} should name {names}");
        }
    }

    #[test]
    fn runtime_names_parse_and_print() {
        assert_eq!("auto".parse::<RuntimeChoice>(), Ok(RuntimeChoice::Auto));
        assert_eq!(
            "gvisor".parse::<RuntimeChoice>(),
            Ok(RuntimeChoice::Lane(LaneName::Gvisor))
        );
        let bad = "docker".parse::<RuntimeChoice>().unwrap_err();
        assert_eq!(
            bad.to_string(),
            "unknown runtime 'docker': use auto, process, gvisor, microvm, wasm"
        );
        assert_eq!(RuntimeChoice::Lane(LaneName::Process).to_string(), "process");
    }
}
