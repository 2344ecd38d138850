//! Checks of `spec.history` beyond the schema, and the history stream it asks for. The CRD's
//! pattern, bounds and CEL rules already refuse most of this at the API server; the messages
//! here name the exact field and say what RabbitMQ accepts, and they also cover objects stored
//! before the CRD had these rules.

use std::collections::BTreeSet;

use super::MAX_EXCHANGE_NAME_BYTES;
use super::access::topic_pattern_problem;
use crate::crd::{HistorySpec, MAX_SEGMENT_BYTES, MIN_HISTORY_BYTES, StreamArguments};
use crate::topology::DesiredHistory;

/// The units of RabbitMQ's `x-max-age`: years, months, days, hours, minutes, seconds.
const MAX_AGE_UNITS: [char; 6] = ['Y', 'M', 'D', 'h', 'm', 's'];
/// The most patterns the CRD allows.
const MAX_PATTERNS: usize = 64;

/// Whether `value` is an `x-max-age` RabbitMQ accepts and the CRD allows: a positive whole
/// number of at most nine digits, without a leading zero, and one unit.
fn is_max_age(value: &str) -> bool {
    let Some(unit) = value.chars().last() else {
        return false;
    };
    let number = &value[..value.len() - unit.len_utf8()];
    MAX_AGE_UNITS.contains(&unit)
        && (1..=9).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_digit())
        && !number.starts_with('0')
}

/// Every problem of `history`; `stream` is the stream it would declare.
pub(super) fn check(problems: &mut Vec<String>, history: &HistorySpec, stream: &str) {
    if !is_max_age(&history.max_age) {
        problems.push(format!(
            "spec.history.maxAge {:?} must be a positive whole number and one unit, Y (years), M (months), D (days), h, m or s, such as 24h or 7D (RabbitMQ's x-max-age)",
            history.max_age
        ));
    }
    if history.max_bytes < MIN_HISTORY_BYTES {
        problems.push(format!(
            "spec.history.maxBytes must be at least {MIN_HISTORY_BYTES} (1 MiB)"
        ));
    }
    if let Some(segment) = history.max_segment_bytes {
        if !(MIN_HISTORY_BYTES..=MAX_SEGMENT_BYTES).contains(&segment) {
            problems.push(format!(
                "spec.history.maxSegmentBytes must be between {MIN_HISTORY_BYTES} (1 MiB) and {MAX_SEGMENT_BYTES} (RabbitMQ's limit)"
            ));
        } else if segment > history.max_bytes {
            problems.push(
                "spec.history.maxSegmentBytes must not exceed maxBytes: RabbitMQ removes whole segments only, never the one being written"
                    .into(),
            );
        }
    }
    if history.patterns.is_empty() {
        problems.push(
            "spec.history.patterns must list at least one pattern ('#' keeps every event)".into(),
        );
    } else if history.patterns.len() > MAX_PATTERNS {
        problems.push(format!(
            "spec.history.patterns has {} patterns; the limit is {MAX_PATTERNS}",
            history.patterns.len()
        ));
    }
    for (index, pattern) in history.patterns.iter().enumerate() {
        if let Some(problem) = topic_pattern_problem(pattern) {
            problems.push(format!(
                "spec.history.patterns[{index}] {pattern:?} {problem}"
            ));
        }
    }
    if history.enabled && stream.len() > MAX_EXCHANGE_NAME_BYTES {
        problems.push(format!(
            "the history stream {stream:?} would be longer than {MAX_EXCHANGE_NAME_BYTES} bytes; shorten spec.rabbitmq.exchange"
        ));
    }
}

/// The stream a valid, enabled `history` asks for.
pub(super) fn desired(history: &HistorySpec, stream: String) -> DesiredHistory {
    DesiredHistory {
        stream,
        arguments: StreamArguments {
            max_age: history.max_age.clone(),
            max_bytes: history.max_bytes,
            max_segment_bytes: history.max_segment_bytes,
        },
        patterns: history.patterns.iter().cloned().collect::<BTreeSet<_>>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EventRouter, MAX_AGE_PATTERN};
    use crate::validate::tests::{a_cluster_with_the_secret, a_router_named};
    use crate::validate::validate;

    fn with_history(history: HistorySpec) -> EventRouter {
        let mut router = a_router_named("chat");
        router.spec.history = Some(history);
        router
    }

    fn problems_of(router: &EventRouter) -> Vec<String> {
        validate(router, &a_cluster_with_the_secret())
            .expect_err("the spec must be rejected")
            .problems
    }

    #[test]
    fn max_age_is_rabbitmqs_syntax_and_agrees_with_the_crd_pattern() {
        // The CRD's pattern is a plain regular expression; read it back by hand rather than
        // pulling in a regex crate: `^[1-9][0-9]{0,8}[YMDhms]$`.
        assert_eq!(MAX_AGE_PATTERN, "^[1-9][0-9]{0,8}[YMDhms]$");
        for ok in ["24h", "7D", "1Y", "3M", "90m", "30s", "999999999s"] {
            assert!(is_max_age(ok), "{ok}");
        }
        for bad in [
            "",
            "h",
            "0h",
            "024h",
            "24",
            "24H",
            "24d",
            "1h30m",
            "24 h",
            "-1h",
            "1.5h",
            "1ms",
            "1000000000s",
            "24hours",
            "２h",
        ] {
            assert!(!is_max_age(bad), "{bad}");
        }
    }

    #[test]
    fn an_enabled_history_plans_its_stream_on_the_routers_exchange() {
        let mut router = with_history(HistorySpec {
            max_age: "7D".into(),
            max_bytes: 8 * 1_048_576,
            max_segment_bytes: Some(2 * 1_048_576),
            patterns: vec!["order.#".into(), "user.*".into()],
            ..HistorySpec::enabled()
        });
        router.spec.rabbitmq.exchange = Some("events.chat".into());
        let plan = validate(&router, &a_cluster_with_the_secret()).expect("valid");
        assert_eq!(
            plan.topology.history,
            Some(DesiredHistory {
                stream: "events.chat.history".into(),
                arguments: StreamArguments {
                    max_age: "7D".into(),
                    max_bytes: 8 * 1_048_576,
                    max_segment_bytes: Some(2 * 1_048_576),
                },
                patterns: BTreeSet::from(["order.#".into(), "user.*".into()]),
            })
        );
        // Off (or unset): no stream.
        router.spec.history = Some(HistorySpec::default());
        let plan = validate(&router, &a_cluster_with_the_secret()).expect("valid");
        assert_eq!(plan.topology.history, None);
        router.spec.history = None;
        let plan = validate(&router, &a_cluster_with_the_secret()).expect("valid");
        assert_eq!(plan.topology.history, None);
    }

    #[test]
    fn the_defaults_keep_every_event_for_a_day_up_to_a_gibibyte() {
        let plan = validate(
            &with_history(HistorySpec::enabled()),
            &a_cluster_with_the_secret(),
        )
        .expect("valid");
        let history = plan.topology.history.expect("a stream");
        assert_eq!(history.stream, "chat.history");
        assert_eq!(
            history.arguments,
            StreamArguments {
                max_age: "24h".into(),
                max_bytes: 1_073_741_824,
                max_segment_bytes: None,
            }
        );
        assert_eq!(history.patterns, BTreeSet::from(["#".to_string()]));
    }

    #[test]
    fn a_bad_history_is_refused_naming_each_field() {
        let router = with_history(HistorySpec {
            max_age: "24 hours".into(),
            max_bytes: 1024,
            max_segment_bytes: Some(MAX_SEGMENT_BYTES + 1),
            patterns: vec!["order.#".into(), "order*".into(), "a..b".into()],
            ..HistorySpec::enabled()
        });
        assert_eq!(
            problems_of(&router),
            [
                r#"spec.history.maxAge "24 hours" must be a positive whole number and one unit, Y (years), M (months), D (days), h, m or s, such as 24h or 7D (RabbitMQ's x-max-age)"#,
                "spec.history.maxBytes must be at least 1048576 (1 MiB)",
                "spec.history.maxSegmentBytes must be between 1048576 (1 MiB) and 3000000000 (RabbitMQ's limit)",
                r#"spec.history.patterns[1] "order*" has the word "order*": '*' and '#' must be whole words (e.g. 'order.*', not 'order*')"#,
                r#"spec.history.patterns[2] "a..b" has an empty word (leading, trailing or doubled '.')"#,
            ]
        );
        // Checked even while off: the spec is what is stored.
        let router = with_history(HistorySpec {
            max_age: "0h".into(),
            ..HistorySpec::default()
        });
        assert_eq!(problems_of(&router).len(), 1);
    }

    #[test]
    fn segments_larger_than_the_stream_and_pattern_lists_out_of_bounds_are_refused() {
        let router = with_history(HistorySpec {
            max_bytes: 4 * 1_048_576,
            max_segment_bytes: Some(8 * 1_048_576),
            patterns: Vec::new(),
            ..HistorySpec::enabled()
        });
        assert_eq!(
            problems_of(&router),
            [
                "spec.history.maxSegmentBytes must not exceed maxBytes: RabbitMQ removes whole segments only, never the one being written",
                "spec.history.patterns must list at least one pattern ('#' keeps every event)",
            ]
        );
        let router = with_history(HistorySpec {
            patterns: (0..65).map(|i| format!("p{i}.#")).collect(),
            ..HistorySpec::enabled()
        });
        assert_eq!(
            problems_of(&router),
            ["spec.history.patterns has 65 patterns; the limit is 64"]
        );
    }

    #[test]
    fn the_stream_name_must_fit_amqp() {
        let mut router = with_history(HistorySpec::enabled());
        // 247 bytes + ".history" = 255: fits; one more does not (nor does the control
        // exchange's, whose suffix is as long).
        router.spec.rabbitmq.exchange = Some("e".repeat(247));
        validate(&router, &a_cluster_with_the_secret()).expect("fits");
        router.spec.rabbitmq.exchange = Some("e".repeat(248));
        let problems = problems_of(&router);
        assert!(
            problems.iter().any(|p| p.starts_with("the history stream ")
                && p.ends_with("would be longer than 255 bytes; shorten spec.rabbitmq.exchange")),
            "{problems:?}"
        );
    }
}
