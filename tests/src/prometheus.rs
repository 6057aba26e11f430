//! A strict reader of Prometheus's text exposition format (0.0.4), for
//! tests of `/metrics`: it refuses what a Prometheus server would refuse,
//! and more (a sample before its family's `# TYPE`, a family declared
//! twice, histogram buckets that are not cumulative or whose `+Inf` bucket
//! differs from `_count`), and returns every sample by name and labels.

use std::collections::{BTreeMap, HashMap, HashSet};

/// A sample's labels, sorted by name.
pub type Labels = BTreeMap<String, String>;

/// A parsed page.
#[derive(Debug, Default)]
pub struct Page {
    /// `# TYPE` of each family.
    pub types: HashMap<String, String>,
    samples: HashMap<(String, Labels), f64>,
}

impl Page {
    /// The value of sample `name` with exactly these labels, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    /// [`get`](Self::get), with an absent sample read as 0 (a labelled
    /// child appears only once it was first used).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every sample of `name`, with its labels.
    pub fn samples_of(&self, name: &str) -> Vec<(&Labels, f64)> {
        self.samples
            .iter()
            .filter(|((sample, _), _)| sample == name)
            .map(|((_, labels), value)| (labels, *value))
            .collect()
    }
}

/// Parses `text`, or says which line is wrong and why.
pub fn parse(text: &str) -> Result<Page, String> {
    let mut page = Page::default();
    let mut helped: HashSet<String> = HashSet::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the page does not end with a line feed".to_owned());
    }
    for (number, line) in text.lines().enumerate() {
        let fail = |why: &str| Err(format!("line {}: {why}: {line:?}", number + 1));
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').unwrap_or((rest, ""));
            if !valid_metric_name(name) {
                return fail("invalid metric name");
            }
            if !helped.insert(name.to_owned()) {
                return fail("a second HELP for the family");
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let Some((name, kind)) = rest.split_once(' ') else {
                return fail("TYPE without a type");
            };
            if !valid_metric_name(name) {
                return fail("invalid metric name");
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return fail("unknown type");
            }
            if page
                .samples
                .keys()
                .any(|(sample, _)| family_of(&page, sample) == Some(name))
            {
                return fail("TYPE after the family's samples");
            }
            if page
                .types
                .insert(name.to_owned(), kind.to_owned())
                .is_some()
            {
                return fail("a second TYPE for the family");
            }
        } else if line.starts_with('#') || line.is_empty() {
            // A comment or a blank line: allowed, meaningless.
        } else {
            let (name, labels, value) = match sample(line) {
                Ok(parsed) => parsed,
                Err(why) => return fail(&why),
            };
            let Some(family) = family_of(&page, &name) else {
                return fail("a sample without a TYPE before it");
            };
            if page.types[family] == "histogram"
                && !name.ends_with("_bucket")
                && !name.ends_with("_sum")
                && !name.ends_with("_count")
            {
                return fail("a histogram sample that is no bucket, sum or count");
            }
            if page.samples.insert((name, labels), value).is_some() {
                return fail("a duplicate sample");
            }
        }
    }
    check_histograms(&page)?;
    Ok(page)
}

/// The family a sample belongs to: its own name, or its name without a
/// histogram's suffix.
fn family_of<'a>(page: &'a Page, sample: &str) -> Option<&'a str> {
    if let Some((name, _)) = page.types.get_key_value(sample) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = sample.strip_suffix(suffix)?;
        let (name, kind) = page.types.get_key_value(base)?;
        (kind == "histogram" || kind == "summary").then_some(name.as_str())
    })
}

/// Buckets of each histogram child are cumulative, end with `+Inf`, and
/// `+Inf` equals `_count`.
fn check_histograms(page: &Page) -> Result<(), String> {
    for (family, kind) in &page.types {
        if kind != "histogram" {
            continue;
        }
        let mut children: HashMap<Labels, Vec<(f64, f64)>> = HashMap::new();
        for (labels, value) in page.samples_of(&format!("{family}_bucket")) {
            let mut child = labels.clone();
            let le = child
                .remove("le")
                .ok_or_else(|| format!("{family}: a bucket without le"))?;
            let bound = parse_value(&le).map_err(|why| format!("{family}: le {le:?}: {why}"))?;
            children.entry(child).or_default().push((bound, value));
        }
        for (labels, mut buckets) in children {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|pair| pair[0].1 > pair[1].1) {
                return Err(format!("{family}{labels:?}: buckets are not cumulative"));
            }
            let Some(&(last, infinite)) = buckets.last() else {
                continue;
            };
            if last != f64::INFINITY {
                return Err(format!("{family}{labels:?}: no +Inf bucket"));
            }
            let pairs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let count = page.get(&format!("{family}_count"), &pairs);
            if count != Some(infinite) {
                return Err(format!(
                    "{family}{labels:?}: +Inf bucket {infinite} but count {count:?}"
                ));
            }
            if page.get(&format!("{family}_sum"), &pairs).is_none() {
                return Err(format!("{family}{labels:?}: no _sum"));
            }
        }
    }
    Ok(())
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `name{a="1",b="2"} value` (an optional timestamp is refused: Larder
/// writes none).
fn sample(line: &str) -> Result<(String, Labels, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err("invalid metric name".to_owned());
    }
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after_equals) = inner.split_once('=').ok_or("a label without =")?;
            if !valid_label_name(label) {
                return Err(format!("invalid label name {label:?}"));
            }
            let quoted = after_equals
                .strip_prefix('"')
                .ok_or("a label value without quotes")?;
            let mut chars = quoted.char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next() {
                    Some((index, '"')) => break index + 1,
                    Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("invalid escape {other:?}")),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".to_owned()),
                }
            };
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label} twice"));
            }
            inner = &quoted[end..];
            if let Some(after) = inner.strip_prefix(',') {
                inner = after;
            } else if !inner.starts_with('}') {
                return Err("labels must be separated by ','".to_owned());
            }
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    if value.contains(' ') {
        return Err("more than one value (timestamps are not expected)".to_owned());
    }
    Ok((name.to_owned(), labels, parse_value(value)?))
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text
            .parse()
            .map_err(|error| format!("value {text:?}: {error}")),
    }
}

/// Fails unless this test has its process to itself, which tests that
/// compare Larder's process-wide metrics before and after (exact deltas, a
/// gauge's peak) rely on: under `cargo test`, tests share one process and
/// one registry, and another test's requests would move the figures.
/// cargo-nextest, which `ops/test.sh` runs, starts each test in its own
/// process and says so in `NEXTEST_EXECUTION_MODE`.
pub fn assert_metrics_are_this_tests_own() {
    let mode = std::env::var("NEXTEST_EXECUTION_MODE").unwrap_or_default();
    assert_eq!(
        mode, "process-per-test",
        "this test reads the process-wide metrics registry, so it must run in \
         a process of its own: run it with cargo-nextest (ops/test.sh)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_larder_writes_and_refuses_malformed_pages() {
        let page = parse(
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\",y=\"\"} 3\n\
             # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n",
        )
        .expect("a valid page");
        assert_eq!(
            page.get("a_total", &[("x", "q\"\\\n"), ("y", "")]),
            Some(3.0)
        );
        assert_eq!(page.get("h_count", &[]), Some(2.0));
        for bad in [
            "a 1\n",
            "# TYPE a counter\na{x=\"1} 1\n",
            "# TYPE a counter\na{x=1} 1\n",
            "# TYPE a counter\na{x=\"\\t\"} 1\n",
            "# TYPE a counter\na 1 2 3\n",
            "# TYPE a counter\na one\n",
            "# TYPE a counter\na 1\na 2\n",
            "# TYPE a counter\n# TYPE a counter\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
            "# TYPE a counter\na 1",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
