//! Stage 5, **decide**: evaluate the policy set on the input document and
//! turn its answer, or its failure, into one ruling with a reason.
//!
//! This is the single decision function: every outcome, including errors,
//! leaves here with an action and the reasons behind it.

use std::sync::Arc;
use std::time::Instant;

use crate::config::{Mode, OnError};
use crate::metrics::{Metrics, Outcome};
use crate::policy::{CacheUse, Decision, EvalLimits, PolicySet};

/// What the enforce stage must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the request to its destination.
    Forward,
    /// Answer 403 with the deny reasons.
    Deny,
    /// Answer 503: the policy could not be evaluated (fail closed).
    Unavailable,
}

#[derive(Debug, Clone)]
pub struct Ruling {
    pub action: Action,
    pub outcome: Outcome,
    /// Whether the policy's answer was applied as given.
    pub enforced: bool,
    pub decision: Decision,
    pub error: Option<String>,
    /// What the audit record takes from the set that decided (revision,
    /// bundle, minimisation rules).
    pub stamp: Arc<crate::policy::Stamp>,
}

/// How decisions are applied; fixed for the process's life.
#[derive(Debug, Clone, Copy)]
pub struct DecidePolicy {
    pub mode: Mode,
    pub on_error: OnError,
    pub limits: EvalLimits,
    /// `[policy] decision_cache`: decisions kept per worker thread.
    pub cache_entries: usize,
}

impl DecidePolicy {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        DecidePolicy {
            mode: cfg.server.mode,
            on_error: cfg.policy.on_error,
            limits: EvalLimits {
                timeout: cfg.policy.eval_timeout.0,
                ..EvalLimits::default()
            },
            cache_entries: cfg.policy.decision_cache,
        }
    }
}

/// The input document handed to [`decide`].
pub enum Document<'a> {
    /// rempart's input, built only as far as the set reads and only when
    /// the decision cache does not already hold its decision.
    AsRead(crate::input::Reading<'a>),
    /// The whole document (OPA-Envoy's extra fields included): always
    /// evaluated.
    Whole(regorus::Value),
}

/// Evaluates the input document of a [`crate::input::PolicyInput`].
pub fn decide(
    set: &Arc<PolicySet>,
    input: Document<'_>,
    how: &DecidePolicy,
    metrics: &Metrics,
) -> Ruling {
    let started = Instant::now();
    let (result, cache) = match input {
        Document::AsRead(input) => set.decide(&input, &how.limits, how.cache_entries),
        Document::Whole(v) => (set.evaluate(v, &how.limits), CacheUse::Bypassed),
    };
    metrics.count_decision(cache, started.elapsed().as_secs_f64());
    rule(result, how, Arc::clone(set.stamp()), metrics)
}

/// A ruling of rempart's own, when a request is refused before or instead
/// of the policy's answer (egress: bad request, proxy authentication,
/// limits, DNS): one reason, as a policy would give it.
pub fn refusal(
    code: &str,
    message: &str,
    outcome: Outcome,
    stamp: Arc<crate::policy::Stamp>,
) -> Ruling {
    Ruling {
        action: Action::Deny,
        outcome,
        enforced: true,
        decision: Decision {
            allow: false,
            deny: vec![crate::policy::Reason {
                code: code.into(),
                message: message.into(),
            }],
            warn: Vec::new(),
            response: None,
        },
        error: None,
        stamp,
    }
}

/// Turns an evaluation result into a ruling (kept apart from evaluation so
/// that every branch is unit-tested).
pub fn rule(
    result: anyhow::Result<Decision>,
    how: &DecidePolicy,
    stamp: Arc<crate::policy::Stamp>,
    metrics: &Metrics,
) -> Ruling {
    match result {
        Ok(decision) if decision.allow => Ruling {
            action: Action::Forward,
            outcome: Outcome::Allowed,
            enforced: true,
            decision,
            error: None,
            stamp,
        },
        Ok(decision) => match how.mode {
            Mode::Enforce => Ruling {
                action: Action::Deny,
                outcome: Outcome::Denied,
                enforced: true,
                decision,
                error: None,
                stamp,
            },
            Mode::Monitor => Ruling {
                action: Action::Forward,
                outcome: Outcome::Monitored,
                enforced: false,
                decision,
                error: None,
                stamp,
            },
        },
        Err(e) => {
            metrics.policy_evaluation_errors.inc();
            let error = format!("{e:#}");
            tracing::warn!(revision = %stamp.revision, "policy evaluation error: {error}");
            let fail_closed = how.mode == Mode::Enforce && how.on_error == OnError::Deny;
            Ruling {
                action: if fail_closed {
                    Action::Unavailable
                } else {
                    Action::Forward
                },
                outcome: Outcome::Error,
                enforced: fail_closed,
                decision: Decision {
                    allow: false,
                    deny: vec![crate::policy::Reason {
                        code: "policy_error".into(),
                        message: "the policy could not be evaluated".into(),
                    }],
                    warn: Vec::new(),
                    response: None,
                },
                error: Some(error),
                stamp,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Reason;

    fn how(mode: Mode, on_error: OnError) -> DecidePolicy {
        DecidePolicy {
            mode,
            on_error,
            limits: EvalLimits::default(),
            cache_entries: 0,
        }
    }

    fn denied() -> Decision {
        Decision {
            allow: false,
            deny: vec![Reason {
                code: "x".into(),
                message: String::new(),
            }],
            warn: vec![],
            response: None,
        }
    }

    #[test]
    fn every_branch_has_an_action_and_outcome() {
        let m = Metrics::new();
        let ok = Decision {
            allow: true,
            deny: vec![],
            warn: vec![],
            response: None,
        };
        let r = rule(
            Ok(ok),
            &how(Mode::Enforce, OnError::Deny),
            crate::policy::Stamp::revision("r"),
            &m,
        );
        assert_eq!((r.action, r.outcome), (Action::Forward, Outcome::Allowed));
        let r = rule(
            Ok(denied()),
            &how(Mode::Enforce, OnError::Deny),
            crate::policy::Stamp::revision("r"),
            &m,
        );
        assert_eq!(
            (r.action, r.outcome, r.enforced),
            (Action::Deny, Outcome::Denied, true)
        );
        let r = rule(
            Ok(denied()),
            &how(Mode::Monitor, OnError::Deny),
            crate::policy::Stamp::revision("r"),
            &m,
        );
        assert_eq!(
            (r.action, r.outcome, r.enforced),
            (Action::Forward, Outcome::Monitored, false)
        );
        let r = rule(
            Err(anyhow::anyhow!("boom")),
            &how(Mode::Enforce, OnError::Deny),
            crate::policy::Stamp::revision("r"),
            &m,
        );
        assert_eq!((r.action, r.outcome), (Action::Unavailable, Outcome::Error));
        assert_eq!(r.decision.deny[0].code, "policy_error");
        let r = rule(
            Err(anyhow::anyhow!("boom")),
            &how(Mode::Enforce, OnError::Allow),
            crate::policy::Stamp::revision("r"),
            &m,
        );
        assert_eq!(
            (r.action, r.outcome, r.enforced),
            (Action::Forward, Outcome::Error, false)
        );
        assert_eq!(m.policy_evaluation_errors.get(), 2);
    }
}
