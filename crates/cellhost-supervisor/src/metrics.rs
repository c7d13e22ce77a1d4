//! `/metrics`: Prometheus text exposition format 0.0.4, written by hand
//! (a dozen series; a registry crate would add more code than it saves).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::error::SupervisorError;
use crate::supervisor::Supervisor;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], v: f64) {
    let _ = write!(out, "{name}");
    if !labels.is_empty() {
        let parts: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = write!(out, "{{{}}}", parts.join(","));
    }
    let _ = writeln!(out, " {v}");
}

/// Label values escape `\`, `"` and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn render(sup: &Supervisor) -> Result<String, SupervisorError> {
    let mut o = String::new();
    family(
        &mut o,
        "cellhost_cells",
        "gauge",
        "Cell records by tier and observed state.",
    );
    for (tier, state, n) in sup.cell_states().await? {
        sample(
            &mut o,
            "cellhost_cells",
            &[("tier", &tier), ("state", &state)],
            n as f64,
        );
    }
    let c = &sup.counters;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let (cap, res) = (sup.capacity(), sup.reserved());
    // One unlabelled sample each: (name, type, help, value).
    let scalars: [(&str, &str, &str, f64); 16] = [
        (
            "cellhost_creates_total",
            "counter",
            "Cells created and started.",
            n(&c.creates),
        ),
        (
            "cellhost_create_failures_total",
            "counter",
            "Creates that failed and were rolled back.",
            n(&c.create_failures),
        ),
        (
            "cellhost_admission_refusals_total",
            "counter",
            "Creates refused for lack of capacity.",
            n(&c.admission_refusals),
        ),
        (
            "cellhost_destroys_total",
            "counter",
            "Cells destroyed with a clean TeardownReport.",
            n(&c.destroys),
        ),
        (
            "cellhost_dirty_teardowns_total",
            "counter",
            "Teardowns that left residue (retried by reconcile).",
            n(&c.dirty_teardowns),
        ),
        (
            "cellhost_leases_reaped_total",
            "counter",
            "Cells destroyed at lease expiry.",
            n(&c.leases_reaped),
        ),
        (
            "cellhost_orphans_destroyed_total",
            "counter",
            "Host objects without a record destroyed by reconcile.",
            n(&c.orphans_destroyed),
        ),
        (
            "cellhost_creates_rolled_back_total",
            "counter",
            "Interrupted creates rolled back by reconcile.",
            n(&c.rolled_back),
        ),
        (
            "cellhost_reconcile_passes_total",
            "counter",
            "Reconcile passes run.",
            n(&c.reconcile_passes),
        ),
        (
            "cellhost_reconcile_errors_total",
            "counter",
            "Errors met by reconcile.",
            n(&c.reconcile_errors),
        ),
        (
            "cellhost_create_seconds_sum",
            "counter",
            "Total create-to-running time of successful creates.",
            n(&c.create_us_sum) / 1e6,
        ),
        (
            "cellhost_capacity_cpus",
            "gauge",
            "CPUs cells may reserve (logical CPUs x overcommit).",
            cap.cpus,
        ),
        (
            "cellhost_reserved_cpus",
            "gauge",
            "CPUs reserved by cells.",
            res.cpus,
        ),
        (
            "cellhost_capacity_memory_bytes",
            "gauge",
            "Memory cells may reserve.",
            cap.memory_bytes as f64,
        ),
        (
            "cellhost_reserved_memory_bytes",
            "gauge",
            "Memory reserved by cells.",
            res.memory_bytes as f64,
        ),
        (
            "cellhost_uptime_seconds",
            "gauge",
            "Seconds since the supervisor started.",
            sup.uptime().as_secs_f64(),
        ),
    ];
    for (name, kind, help, v) in scalars {
        family(&mut o, name, kind, help);
        sample(&mut o, name, &[], v);
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut o = String::new();
        sample(&mut o, "m", &[("a", "x\"y\\z\nw")], 1.0);
        assert_eq!(o, "m{a=\"x\\\"y\\\\z\\nw\"} 1\n");
    }
}
