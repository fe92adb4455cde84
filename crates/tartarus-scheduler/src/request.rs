//! What a sandbox asks of the cluster: resources, a resource class, hard constraints (selector,
//! tolerations, quarantine) and soft preferences (label affinity and anti-affinity, spreading its group).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::node::{check_id, shorten, IdProblem, Taint, QUARANTINE_CLASS};
use crate::resources::Resources;

/// The largest preference weight; a term's weight is 1 to this.
pub const MAX_WEIGHT: u32 = 100;

/// Lets a request onto nodes with a matching taint (of either effect).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Toleration {
    /// The taint key tolerated.
    pub key: String,
    /// The taint value tolerated; `None` tolerates any value.
    #[serde(default)]
    pub value: Option<String>,
}

impl Toleration {
    /// Tolerates the taint `key` whatever its value.
    pub fn any_value(key: impl Into<String>) -> Self {
        Toleration {
            key: key.into(),
            value: None,
        }
    }

    /// Tolerates the taint `key=value` only.
    pub fn exact(key: impl Into<String>, value: impl Into<String>) -> Self {
        Toleration {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// Whether this toleration covers `taint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        self.key == taint.key && self.value.as_ref().is_none_or(|value| *value == taint.value)
    }
}

/// A weighted preference for (affinity) or against (anti-affinity) nodes with a label.
///
/// Each matching term moves a node's score by `weight ×` [`crate::WEIGHT_POINTS`]: a weight of
/// [`MAX_WEIGHT`] is worth the whole range of the load score, so it wins over any difference in load.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LabelTerm {
    /// The node label key.
    pub key: String,
    /// The value it must have; `None` matches any node that has the key.
    #[serde(default)]
    pub value: Option<String>,
    /// 1 to [`MAX_WEIGHT`] (larger weights count as [`MAX_WEIGHT`]).
    pub weight: u32,
}

impl LabelTerm {
    /// Nodes labelled `key=value`, with the given weight.
    pub fn new(key: impl Into<String>, value: impl Into<String>, weight: u32) -> Self {
        LabelTerm {
            key: key.into(),
            value: Some(value.into()),
            weight,
        }
    }

    /// Nodes that have the label `key` at all, with the given weight.
    pub fn has_key(key: impl Into<String>, weight: u32) -> Self {
        LabelTerm {
            key: key.into(),
            value: None,
            weight,
        }
    }

    /// Whether a node with these labels matches.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match (labels.get(&self.key), &self.value) {
            (Some(have), Some(want)) => have == want,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// A sandbox to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Unique among reservations (the sandbox id, usually).
    pub id: String,
    /// What it needs.
    pub resources: Resources,
    /// Its resource class (`ember`, `flame`, `blaze`, `inferno`, `quarantine`); see [`crate::Node::pools`].
    #[serde(default)]
    pub class: Option<String>,
    /// Node labels that must all match exactly.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Taints it tolerates.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Preferred node labels (score bonus).
    #[serde(default)]
    pub affinity: Vec<LabelTerm>,
    /// Avoided node labels (score penalty).
    #[serde(default)]
    pub anti_affinity: Vec<LabelTerm>,
    /// The group it is a replica of; a node's [`crate::Node::groups`] counts the group's reservations on it.
    #[serde(default)]
    pub group: Option<String>,
    /// Prefer nodes that run fewer of `group` ([`crate::SPREAD_PENALTY`] per replica already there).
    #[serde(default)]
    pub spread: bool,
    /// Quarantined work goes only to quarantine nodes. The class `quarantine` implies it.
    #[serde(default)]
    pub quarantined: bool,
    /// The isolation lane it runs on: only nodes that run it ([`crate::Node::lanes`]) can take it.
    /// `None`: any node.
    #[serde(default)]
    pub lane: Option<String>,
}

impl Request {
    /// A request for `resources` with no class, constraints or preferences.
    pub fn new(id: impl Into<String>, resources: Resources) -> Self {
        Request {
            id: id.into(),
            resources,
            class: None,
            selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: Vec::new(),
            anti_affinity: Vec::new(),
            group: None,
            spread: false,
            quarantined: false,
            lane: None,
        }
    }

    /// Of the resource class `class`.
    pub fn with_class(mut self, class: impl Into<String>) -> Self {
        self.class = Some(class.into());
        self
    }

    /// Requiring the node label `key=value`.
    pub fn with_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.selector.insert(key.into(), value.into());
        self
    }

    /// Tolerating a taint.
    pub fn with_toleration(mut self, toleration: Toleration) -> Self {
        self.tolerations.push(toleration);
        self
    }

    /// Preferring nodes that match `term`.
    pub fn with_affinity(mut self, term: LabelTerm) -> Self {
        self.affinity.push(term);
        self
    }

    /// Avoiding nodes that match `term`.
    pub fn with_anti_affinity(mut self, term: LabelTerm) -> Self {
        self.anti_affinity.push(term);
        self
    }

    /// A replica of `group`; with `spread`, preferring nodes that run fewer of it.
    pub fn in_group(mut self, group: impl Into<String>, spread: bool) -> Self {
        self.group = Some(group.into());
        self.spread = spread;
        self
    }

    /// Running on the isolation lane `lane`.
    pub fn with_lane(mut self, lane: impl Into<String>) -> Self {
        self.lane = Some(lane.into());
        self
    }

    /// Quarantined, or not.
    pub fn with_quarantined(mut self, quarantined: bool) -> Self {
        self.quarantined = quarantined;
        self
    }

    /// Whether it must go to a quarantine node: marked quarantined, or of the `quarantine` class.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined || self.class.as_deref() == Some(QUARANTINE_CLASS)
    }

    /// Checks that the request makes sense: a usable id, no empty keys or names, weights of 1 to
    /// [`MAX_WEIGHT`], and a group when it asks to spread. [`crate::Cluster::reserve`] checks this;
    /// [`crate::place()`] does not need to.
    pub fn validate(&self) -> Result<(), RequestError> {
        check_id(&self.id).map_err(|problem| RequestError::Id {
            id: shorten(&self.id),
            problem,
        })?;
        let request = || self.id.clone();
        if self.class.as_deref() == Some("") {
            return Err(RequestError::EmptyClass { request: request() });
        }
        if self.lane.as_deref() == Some("") {
            return Err(RequestError::EmptyLane { request: request() });
        }
        if self.selector.keys().any(String::is_empty) {
            return Err(RequestError::EmptyKey {
                request: request(),
                field: "selector",
            });
        }
        if self
            .tolerations
            .iter()
            .any(|toleration| toleration.key.is_empty())
        {
            return Err(RequestError::EmptyKey {
                request: request(),
                field: "tolerations",
            });
        }
        for (field, terms) in [
            ("affinity", &self.affinity),
            ("anti_affinity", &self.anti_affinity),
        ] {
            for term in terms {
                if term.key.is_empty() {
                    return Err(RequestError::EmptyKey {
                        request: request(),
                        field,
                    });
                }
                if term.weight == 0 || term.weight > MAX_WEIGHT {
                    return Err(RequestError::Weight {
                        request: request(),
                        field,
                        key: term.key.clone(),
                        weight: term.weight,
                    });
                }
            }
        }
        match &self.group {
            Some(group) if group.is_empty() => Err(RequestError::EmptyGroup { request: request() }),
            None if self.spread => Err(RequestError::SpreadWithoutGroup { request: request() }),
            _ => Ok(()),
        }
    }
}

/// A request that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The id is empty, too long or has whitespace or control characters.
    #[error("request id {id:?} {problem}")]
    Id {
        /// The id (shortened).
        id: String,
        /// What is wrong with it.
        problem: IdProblem,
    },
    /// The class is the empty string.
    #[error("request {request}: the class is empty (leave it out instead)")]
    EmptyClass {
        /// The request.
        request: String,
    },
    /// The lane is the empty string.
    #[error("request {request}: the lane is empty (leave it out instead)")]
    EmptyLane {
        /// The request.
        request: String,
    },
    /// A selector, toleration or preference has an empty key.
    #[error("request {request}: an entry of {field} has an empty key")]
    EmptyKey {
        /// The request.
        request: String,
        /// `selector`, `tolerations`, `affinity` or `anti_affinity`.
        field: &'static str,
    },
    /// A preference weight is outside 1 to [`MAX_WEIGHT`].
    #[error("request {request}: {field} weight for {key} is {weight}, not 1 to {MAX_WEIGHT}")]
    Weight {
        /// The request.
        request: String,
        /// `affinity` or `anti_affinity`.
        field: &'static str,
        /// The term's label key.
        key: String,
        /// The weight given.
        weight: u32,
    },
    /// The group name is empty.
    #[error("request {request}: the group name is empty")]
    EmptyGroup {
        /// The request.
        request: String,
    },
    /// `spread` without a group to spread.
    #[error("request {request}: spread needs a group")]
    SpreadWithoutGroup {
        /// The request.
        request: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::TaintEffect;

    fn request() -> Request {
        Request::new("sbx-1", Resources::new(1000, 1 << 30, 0))
    }

    #[test]
    fn test_toleration_without_value_matches_any_value() {
        let taint = Taint::new("gpu", "a100", TaintEffect::NoSchedule);
        assert!(Toleration::any_value("gpu").tolerates(&taint));
        assert!(Toleration::exact("gpu", "a100").tolerates(&taint));
        assert!(!Toleration::exact("gpu", "h100").tolerates(&taint));
        assert!(!Toleration::any_value("dedicated").tolerates(&taint));
    }

    #[test]
    fn test_label_term_matches_value_or_key() {
        let labels = BTreeMap::from([("disk".to_string(), "ssd".to_string())]);
        assert!(LabelTerm::new("disk", "ssd", 10).matches(&labels));
        assert!(!LabelTerm::new("disk", "hdd", 10).matches(&labels));
        assert!(LabelTerm::has_key("disk", 10).matches(&labels));
        assert!(!LabelTerm::has_key("zone", 10).matches(&labels));
    }

    #[test]
    fn test_quarantine_class_implies_quarantined() {
        assert!(!request().is_quarantined());
        assert!(request().with_quarantined(true).is_quarantined());
        assert!(request().with_class("quarantine").is_quarantined());
    }

    #[test]
    fn test_validate_refuses_nonsense() {
        assert!(request().validate().is_ok());
        let err = Request::new("", Resources::ZERO).validate().unwrap_err();
        assert_eq!(err.to_string(), "request id \"\" is empty");
        let err = request()
            .with_affinity(LabelTerm::new("disk", "ssd", 0))
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "request sbx-1: affinity weight for disk is 0, not 1 to 100"
        );
        let err = request()
            .with_anti_affinity(LabelTerm::has_key("spot", 101))
            .validate()
            .unwrap_err();
        assert!(matches!(
            err,
            RequestError::Weight {
                field: "anti_affinity",
                weight: 101,
                ..
            }
        ));
        let err = request().with_selector("", "x").validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "request sbx-1: an entry of selector has an empty key"
        );
        let mut spread = request();
        spread.spread = true;
        assert_eq!(
            spread.validate().unwrap_err().to_string(),
            "request sbx-1: spread needs a group"
        );
        assert!(request().in_group("", false).validate().is_err());
        assert!(request().with_class("").validate().is_err());
        assert_eq!(
            request().with_lane("").validate().unwrap_err().to_string(),
            "request sbx-1: the lane is empty (leave it out instead)"
        );
        assert!(request().with_lane("gvisor").validate().is_ok());
    }
}
