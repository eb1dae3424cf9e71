//! A small metrics registry: atomic counters and gauges, and gauges computed
//! when scraped, rendered in the Prometheus text exposition format (0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing counter. Cheap to clone (shares the value).
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down. Cheap to clone (shares the value).
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Adds `n` (may be negative).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

type GaugeFn = Arc<dyn Fn() -> f64 + Send + Sync>;

enum Source {
    Counter(Counter),
    Gauge(Gauge),
    Fn(GaugeFn),
}

impl Source {
    fn value(&self) -> f64 {
        match self {
            Source::Counter(c) => c.get() as f64,
            Source::Gauge(g) => g.get() as f64,
            Source::Fn(f) => f(),
        }
    }
}

struct Family {
    help: String,
    kind: &'static str,
    samples: BTreeMap<String, Source>,
}

/// The registry. Cheap to clone (shares the metrics).
#[derive(Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// Formats label pairs as `{a="x",b="y"}` (empty for none), escaping values.
fn labels_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s.push('}');
    s
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(
        &self,
        name: &str,
        help: &str,
        kind: &'static str,
        labels: &[(&str, &str)],
        src: Source,
    ) {
        let mut g = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let fam = g.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            samples: BTreeMap::new(),
        });
        fam.samples.insert(labels_text(labels), src);
    }

    /// Registers (or replaces) a counter with these labels and returns it.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        let c = Counter::default();
        self.insert(name, help, "counter", labels, Source::Counter(c.clone()));
        c
    }

    /// Registers (or replaces) a gauge with these labels and returns it.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        let g = Gauge::default();
        self.insert(name, help, "gauge", labels, Source::Gauge(g.clone()));
        g
    }

    /// Registers a gauge whose value `f` computes at each scrape.
    pub fn gauge_fn(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        f: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        self.insert(name, help, "gauge", labels, Source::Fn(Arc::new(f)));
    }

    /// Registers a counter whose value `f` reads at each scrape (for counters
    /// kept elsewhere).
    pub fn counter_fn(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        f: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        self.insert(name, help, "counter", labels, Source::Fn(Arc::new(f)));
    }

    /// Removes every sample of `name` with these labels.
    pub fn remove(&self, name: &str, labels: &[(&str, &str)]) {
        let mut g = self.families.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = g.get_mut(name) {
            f.samples.remove(&labels_text(labels));
        }
    }

    /// The value of one sample (for tests and the dashboard).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let g = self.families.lock().unwrap_or_else(|e| e.into_inner());
        g.get(name)?
            .samples
            .get(&labels_text(labels))
            .map(Source::value)
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self) -> String {
        let g = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::with_capacity(4096);
        for (name, fam) in g.iter() {
            let help = fam.help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {}", fam.kind);
            for (labels, src) in &fam.samples {
                let v = src.value();
                if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
                    let _ = writeln!(out, "{name}{labels} {}", v as i64);
                } else {
                    let _ = writeln!(out, "{name}{labels} {v}");
                }
            }
        }
        out
    }
}

/// A parsed sample of the Prometheus text format: name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the Prometheus text format (what [`Registry::render`] writes and
/// what scrapers accept): checks `# TYPE` lines, metric names, label syntax
/// and values. Used by tests and `replimesh` tooling.
pub fn parse_text(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().ok_or_else(|| err("TYPE without name"))?;
                    let kind = parts.next().ok_or_else(|| err("TYPE without type"))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(err("unknown type"));
                    }
                    if typed.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(err("second TYPE line"));
                    }
                }
                Some("HELP") => {}
                _ => {}
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(line.len());
        let name = &line[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(err("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let close = r.find('}').ok_or_else(|| err("unclosed labels"))?;
            let body = &r[..close];
            rest = &r[close + 1..];
            let mut chars = body.chars().peekable();
            loop {
                let mut k = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '=' {
                        break;
                    }
                    k.push(c);
                    chars.next();
                }
                if k.is_empty() {
                    break;
                }
                if chars.next() != Some('=') || chars.next() != Some('"') {
                    return Err(err("bad label"));
                }
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => match chars.next() {
                            Some('n') => v.push('\n'),
                            Some(c) => v.push(c),
                            None => return Err(err("bad escape")),
                        },
                        Some('"') => break,
                        Some(c) => v.push(c),
                        None => return Err(err("unterminated label value")),
                    }
                }
                labels.insert(k, v);
                match chars.next() {
                    Some(',') => continue,
                    None => break,
                    Some(_) => return Err(err("junk after label")),
                }
            }
        }
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| err("bad value"))?,
        };
        if !typed.contains_key(name) {
            return Err(err("sample without a TYPE line"));
        }
        out.push((name.to_owned(), labels, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_parse() {
        let r = Registry::new();
        let c = r.counter("rm_messages_in_total", "Messages in", &[]);
        let g = r.gauge("rm_connections", "Open connections", &[("kind", "ws")]);
        r.gauge_fn("rm_seq", "Store seq", &[("store", "a\"b")], || 42.0);
        c.add(3);
        g.set(-2);
        let text = r.render();
        let samples = parse_text(&text).unwrap();
        assert_eq!(samples.len(), 3);
        let find = |n: &str| samples.iter().find(|s| s.0 == n).unwrap();
        assert_eq!(find("rm_messages_in_total").2, 3.0);
        assert_eq!(find("rm_connections").2, -2.0);
        assert_eq!(find("rm_connections").1["kind"], "ws");
        assert_eq!(find("rm_seq").1["store"], "a\"b");
        c.inc();
        assert_eq!(r.value("rm_messages_in_total", &[]), Some(4.0));
    }

    #[test]
    fn parser_rejects_junk() {
        assert!(parse_text("foo 1").is_err());
        assert!(parse_text("# TYPE foo counter\nfoo{a=\"x} 1").is_err());
        assert!(parse_text("# TYPE foo counter\nfoo abc").is_err());
        assert!(parse_text("# TYPE foo counter\nfoo 1\n").is_ok());
    }
}
