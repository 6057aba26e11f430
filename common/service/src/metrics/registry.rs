//! The metric types, the registry that owns them, and their rendering in
//! Prometheus's text exposition format, version 0.0.4.
//!
//! A family (one metric name, its help text and label names) holds one
//! child per combination of label values. Looking a child up takes a read
//! lock, creating one a write lock; the child itself is a handful of
//! atomics, so code on a hot path looks its children up once and keeps the
//! `Arc`s (see [`super::HttpMetrics`]). Rendering reads the atomics one by
//! one: a scrape racing with updates may see a histogram's buckets from a
//! moment apart, never a torn number.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A value that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, amount: u64) {
        self.0.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn add(&self, amount: i64) {
        self.0.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations counted into buckets by upper bound, with their sum.
#[derive(Debug)]
pub struct Histogram {
    /// Sorted, finite upper bounds; `+Inf` is implied.
    bounds: Arc<[f64]>,
    /// Observations per bucket, not cumulative; the last is `+Inf`'s.
    counts: Box<[AtomicU64]>,
    /// The sum of all observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: Arc<[f64]>) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            bounds,
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        // A compare-and-swap loop: there is no atomic float add.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// The number of observations.
    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// The sum of the observations.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

/// What a family's children are; each renders its own sample lines.
pub trait Metric: Send + Sync + 'static {
    /// The `# TYPE` of the family.
    const TYPE: &'static str;
    /// Writes the sample lines of one child, `labels` being its rendered
    /// label pairs (`a="1",b="2"`, empty without labels).
    fn render(&self, name: &str, labels: &str, out: &mut String);
}

impl Metric for Counter {
    const TYPE: &'static str = "counter";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        sample(out, name, "", labels, "", &self.get().to_string());
    }
}

impl Metric for Gauge {
    const TYPE: &'static str = "gauge";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        sample(out, name, "", labels, "", &self.get().to_string());
    }
}

impl Metric for Histogram {
    const TYPE: &'static str = "histogram";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        // Cumulative counts from one read of each bucket, so that `+Inf`
        // and `_count` agree even while observations come in.
        let mut cumulative = 0;
        for (index, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = match self.bounds.get(index) {
                Some(bound) => format_float(*bound),
                None => "+Inf".to_owned(),
            };
            let le = format!("le=\"{bound}\"");
            sample(out, name, "_bucket", labels, &le, &cumulative.to_string());
        }
        sample(out, name, "_sum", labels, "", &format_float(self.sum()));
        sample(out, name, "_count", labels, "", &cumulative.to_string());
    }
}

/// One sample line: `name{labels,extra} value`.
fn sample(out: &mut String, name: &str, suffix: &str, labels: &str, extra: &str, value: &str) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || !extra.is_empty() {
        out.push('{');
        out.push_str(labels);
        if !labels.is_empty() && !extra.is_empty() {
            out.push(',');
        }
        out.push_str(extra);
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// A float as Prometheus reads it (Go's `ParseFloat` plus `+Inf`/`-Inf`/`NaN`).
fn format_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

/// A label value with `\`, `"` and line feeds escaped.
fn escape_label_value(value: &str, out: &mut String) {
    for character in value.chars() {
        match character {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            other => out.push(other),
        }
    }
}

/// Help text with `\` and line feeds escaped.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Whether `name` is a valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`), or
/// label name when `colons` is false (no `:`, and no `__` prefix, which
/// Prometheus reserves).
fn is_valid_name(name: &str, colons: bool) -> bool {
    let allowed = |c: char| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
    let mut chars = name.chars();
    chars.next().is_some_and(allowed)
        && chars.all(|c| allowed(c) || c.is_ascii_digit())
        && (colons || !name.starts_with("__"))
}

/// One metric name with its children by label values.
pub struct Family<M> {
    name: &'static str,
    help: &'static str,
    label_names: &'static [&'static str],
    make: Box<dyn Fn() -> M + Send + Sync>,
    /// Children by label values. A list rather than a map: a family has a
    /// few dozen children at most, and hot paths look theirs up once.
    children: RwLock<Vec<(Vec<String>, Arc<M>)>>,
}

impl<M> std::fmt::Debug for Family<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("name", &self.name)
            .field("label_names", &self.label_names)
            .finish_non_exhaustive()
    }
}

impl<M: Metric> Family<M> {
    /// The child for `values`, one per label name in order, created on
    /// first use. Keep the result where the same child is used often.
    ///
    /// # Panics
    ///
    /// When the number of values differs from the number of label names:
    /// a programming error that every test run would show.
    pub fn with(&self, values: &[&str]) -> Arc<M> {
        assert_eq!(
            values.len(),
            self.label_names.len(),
            "metric {} takes the labels {:?}",
            self.name,
            self.label_names
        );
        let find = |children: &[(Vec<String>, Arc<M>)]| {
            children
                .iter()
                .find(|(key, _)| key.iter().map(String::as_str).eq(values.iter().copied()))
                .map(|(_, child)| child.clone())
        };
        if let Some(child) = find(&self.children.read().unwrap_or_else(|p| p.into_inner())) {
            return child;
        }
        let mut children = self.children.write().unwrap_or_else(|p| p.into_inner());
        // Another thread may have created it between the two locks.
        if let Some(child) = find(&children) {
            return child;
        }
        let child = Arc::new((self.make)());
        let key = values.iter().map(|&value| value.to_owned()).collect();
        children.push((key, child.clone()));
        child
    }

    fn render(&self, out: &mut String) {
        let children = self.children.read().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(self.help));
        let _ = writeln!(out, "# TYPE {} {}", self.name, M::TYPE);
        // Sorted, so that a page is stable from one scrape to the next.
        let mut sorted: Vec<_> = children.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (values, child) in sorted {
            let mut labels = String::new();
            for (index, (name, value)) in self.label_names.iter().zip(values).enumerate() {
                if index > 0 {
                    labels.push(',');
                }
                labels.push_str(name);
                labels.push_str("=\"");
                escape_label_value(value, &mut labels);
                labels.push('"');
            }
            child.render(self.name, &labels, out);
        }
    }
}

/// Something the registry can render.
trait Render: Send + Sync {
    fn render(&self, out: &mut String);
}

impl<M: Metric> Render for Family<M> {
    fn render(&self, out: &mut String) {
        Family::render(self, out);
    }
}

/// A set of metric families, rendered together in the order registered.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<dyn Render>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a counter family. By convention its name ends in `_total`.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
    ) -> Arc<Family<Counter>> {
        self.register(name, help, label_names, Counter::default)
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
    ) -> Arc<Family<Gauge>> {
        self.register(name, help, label_names, Gauge::default)
    }

    /// Registers a histogram family with the given bucket upper bounds
    /// (sorted, finite; `+Inf` is added).
    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
        bounds: &[f64],
    ) -> Arc<Family<Histogram>> {
        assert!(
            bounds.windows(2).all(|pair| pair[0] < pair[1])
                && bounds.iter().all(|bound| bound.is_finite()),
            "histogram {name} needs increasing finite bucket bounds"
        );
        let bounds: Arc<[f64]> = bounds.into();
        self.register(name, help, label_names, move || {
            Histogram::new(bounds.clone())
        })
    }

    /// # Panics
    ///
    /// On an invalid metric or label name, or a label named `le` (the
    /// histogram's own): names are literals, so a test run shows it.
    fn register<M: Metric>(
        &self,
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
        make: impl Fn() -> M + Send + Sync + 'static,
    ) -> Arc<Family<M>> {
        assert!(is_valid_name(name, true), "invalid metric name {name:?}");
        for label in label_names {
            assert!(
                is_valid_name(label, false) && *label != "le",
                "invalid label name {label:?} on metric {name}"
            );
        }
        let family = Arc::new(Family {
            name,
            help,
            label_names,
            make: Box::new(make),
            children: RwLock::new(Vec::new()),
        });
        self.families
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(family.clone());
        family
    }

    /// Every family in the text exposition format, version 0.0.4
    /// ([`CONTENT_TYPE`](super::CONTENT_TYPE)).
    pub fn render(&self) -> String {
        let families = self
            .families
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = String::new();
        for family in families {
            family.render(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_with_help_type_and_labels() {
        let registry = Registry::new();
        let requests = registry.counter(
            "test_requests_total",
            "Requests served.",
            &["route", "status"],
        );
        requests.with(&["/b", "200"]).inc_by(3);
        requests.with(&["/a", "404"]).inc();
        requests.with(&["/b", "200"]).inc();
        let depth = registry.gauge("test_depth", "Messages waiting.", &[]);
        depth.with(&[]).set(7);
        depth.with(&[]).add(-2);
        assert_eq!(
            registry.render(),
            "# HELP test_requests_total Requests served.\n\
             # TYPE test_requests_total counter\n\
             test_requests_total{route=\"/a\",status=\"404\"} 1\n\
             test_requests_total{route=\"/b\",status=\"200\"} 4\n\
             # HELP test_depth Messages waiting.\n\
             # TYPE test_depth gauge\n\
             test_depth 5\n"
        );
    }

    #[test]
    fn a_family_without_children_still_shows_its_help_and_type() {
        let registry = Registry::new();
        registry.counter("test_unused_total", "Never incremented.", &["queue"]);
        assert_eq!(
            registry.render(),
            "# HELP test_unused_total Never incremented.\n# TYPE test_unused_total counter\n"
        );
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let registry = Registry::new();
        let latency = registry.histogram("test_seconds", "Latency.", &["route"], &[0.1, 0.5, 1.0]);
        let child = latency.with(&["/x"]);
        for value in [0.05, 0.1, 0.3, 2.0] {
            child.observe(value);
        }
        assert_eq!(child.count(), 4);
        assert_eq!(
            registry.render(),
            "# HELP test_seconds Latency.\n\
             # TYPE test_seconds histogram\n\
             test_seconds_bucket{route=\"/x\",le=\"0.1\"} 2\n\
             test_seconds_bucket{route=\"/x\",le=\"0.5\"} 3\n\
             test_seconds_bucket{route=\"/x\",le=\"1\"} 3\n\
             test_seconds_bucket{route=\"/x\",le=\"+Inf\"} 4\n\
             test_seconds_sum{route=\"/x\"} 2.45\n\
             test_seconds_count{route=\"/x\"} 4\n"
        );
    }

    #[test]
    fn an_unlabelled_histogram_has_only_le() {
        let registry = Registry::new();
        let sizes = registry.histogram("test_bytes", "Sizes.", &[], &[10.0]);
        sizes.with(&[]).observe(20.0);
        let page = registry.render();
        assert!(page.contains("test_bytes_bucket{le=\"10\"} 0\n"), "{page}");
        assert!(
            page.contains("test_bytes_bucket{le=\"+Inf\"} 1\n"),
            "{page}"
        );
        assert!(page.contains("test_bytes_sum 20\n"), "{page}");
        assert!(page.contains("test_bytes_count 1\n"), "{page}");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let registry = Registry::new();
        let family = registry.counter(
            "test_escaped_total",
            "Help with a \\ backslash\nand a new line.",
            &["value"],
        );
        family.with(&["quote \" backslash \\ newline \n end"]).inc();
        assert_eq!(
            registry.render(),
            "# HELP test_escaped_total Help with a \\\\ backslash\\nand a new line.\n\
             # TYPE test_escaped_total counter\n\
             test_escaped_total{value=\"quote \\\" backslash \\\\ newline \\n end\"} 1\n"
        );
    }

    #[test]
    fn floats_render_as_prometheus_reads_them() {
        assert_eq!(format_float(0.005), "0.005");
        assert_eq!(format_float(30.0), "30");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
    }

    #[test]
    fn names_are_checked() {
        assert!(is_valid_name("larder_http_requests_total", true));
        assert!(is_valid_name("a:b", true));
        assert!(!is_valid_name("a:b", false));
        assert!(!is_valid_name("1abc", true));
        assert!(!is_valid_name("", true));
        assert!(!is_valid_name("a-b", true));
        assert!(!is_valid_name("__reserved", false));
    }

    #[test]
    #[should_panic(expected = "takes the labels")]
    fn the_wrong_number_of_label_values_is_a_programming_error() {
        let registry = Registry::new();
        registry.counter("test_x_total", "x", &["a"]).with(&[]);
    }

    #[test]
    fn children_are_shared_between_lookups() {
        let registry = Registry::new();
        let family = registry.counter("test_shared_total", "x", &["a"]);
        let first = family.with(&["1"]);
        first.inc();
        assert!(Arc::ptr_eq(&first, &family.with(&["1"])));
        assert_eq!(family.with(&["1"]).get(), 1);
        assert_eq!(family.with(&["2"]).get(), 0);
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let registry = Registry::new();
        let histogram = registry
            .histogram("test_concurrent", "x", &[], &[1.0])
            .with(&[]);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let histogram = histogram.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        histogram.observe(0.5);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("observer thread");
        }
        assert_eq!(histogram.count(), 4000);
        assert_eq!(histogram.sum(), 2000.0);
    }
}
