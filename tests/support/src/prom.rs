//! The one reader of the Prometheus text exposition format in the tests and the load generator:
//! sample lines `name{labels} value`, looked up by exact series, summed per metric name or
//! grouped by one label. Enough to cross-check what a service counted; histograms are read as
//! their `_bucket`/`_sum`/`_count` series.

use std::collections::BTreeMap;

/// One scrape: every sample line, keyed by its full series text (`name{labels}`).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: Vec<(String, f64)>,
}

impl Scrape {
    /// Parses Prometheus text exposition; comments and malformed lines are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|line| {
                // The value follows the label set; label values may hold spaces.
                let (series, value) = match line.rfind('}') {
                    Some(end) => line.split_at(end + 1),
                    None => line.split_once(' ')?,
                };
                let value = value.split_whitespace().next()?.parse::<f64>().ok()?;
                Some((series.trim().to_owned(), value))
            })
            .collect();
        Self { samples }
    }

    fn series_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.samples.iter().filter_map(move |(series, value)| {
            let rest = series.strip_prefix(name)?;
            (rest.is_empty() || rest.starts_with('{')).then_some((rest, *value))
        })
    }

    /// The value of exactly the series `name{labels}` (`labels` as the exposition writes them,
    /// `k="v"` joined by `,`; `""` for none).
    pub fn value(&self, name: &str, labels: &str) -> Option<f64> {
        let wanted = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        self.series_of(name)
            .find(|(series, _)| *series == wanted)
            .map(|(_, value)| value)
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.series_of(name).next().is_some()
    }

    /// Sum of every series of `name` (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.series_of(name).map(|(_, v)| v).sum()
    }

    /// Values of `name` grouped by the value of `label` (series without it group under "").
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (labels, value) in self.series_of(name) {
            *out.entry(label_value(labels, label).unwrap_or_default())
                .or_insert(0.0) += value;
        }
        out
    }
}

/// The value of `label` in a `{a="x",b="y"}` label set.
fn label_value(labels: &str, label: &str) -> Option<String> {
    let inner = labels.strip_prefix('{')?.strip_suffix('}')?;
    inner.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == label).then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// Per-label differences `after - before`, keeping only non-zero ones.
pub fn delta_by_label(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP eventrouter_deliveries_total Frames queued to clients.
# TYPE eventrouter_deliveries_total counter
eventrouter_deliveries_total 123456
eventrouter_deliveries_total_extra 5
eventrouter_drops_total{reason="slow_consumer"} 3
eventrouter_drops_total{reason="drop oldest"} 4
eventrouter_connections 2000
eventrouter_delivery_latency_seconds_bucket{le="0.001"} 7
process_resident_memory_bytes 1.5e7
"#;

    #[test]
    fn sums_and_labels() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.sum("eventrouter_deliveries_total"), 123456.0);
        assert_eq!(s.sum("eventrouter_drops_total"), 7.0);
        assert_eq!(s.sum("eventrouter_connections"), 2000.0);
        assert_eq!(s.sum("process_resident_memory_bytes"), 1.5e7);
        assert!(!s.has("eventrouter_missing"));
        assert_eq!(s.sum("eventrouter_missing"), 0.0);
        let drops = s.by_label("eventrouter_drops_total", "reason");
        assert_eq!(drops.get("slow_consumer"), Some(&3.0));
        assert_eq!(drops.get("drop oldest"), Some(&4.0));
    }

    #[test]
    fn exact_series() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.value("eventrouter_deliveries_total", ""), Some(123456.0));
        assert_eq!(
            s.value("eventrouter_drops_total", r#"reason="drop oldest""#),
            Some(4.0)
        );
        assert_eq!(s.value("eventrouter_drops_total", ""), None);
        assert_eq!(s.value("eventrouter_deliveries", ""), None);
    }

    #[test]
    fn deltas_keep_changes_only() {
        let before = BTreeMap::from([("a".to_owned(), 1.0), ("b".to_owned(), 2.0)]);
        let after = BTreeMap::from([
            ("a".to_owned(), 1.0),
            ("b".to_owned(), 5.0),
            ("c".to_owned(), 1.0),
        ]);
        let d = delta_by_label(&before, &after);
        assert_eq!(
            d,
            BTreeMap::from([("b".to_owned(), 3.0), ("c".to_owned(), 1.0)])
        );
    }
}
