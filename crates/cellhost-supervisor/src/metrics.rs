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
    let counters: [(&str, &str, u64); 10] = [
        (
            "cellhost_creates_total",
            "Cells created and started.",
            c.creates.load(Ordering::Relaxed),
        ),
        (
            "cellhost_create_failures_total",
            "Creates that failed and were rolled back.",
            c.create_failures.load(Ordering::Relaxed),
        ),
        (
            "cellhost_admission_refusals_total",
            "Creates refused for lack of capacity.",
            c.admission_refusals.load(Ordering::Relaxed),
        ),
        (
            "cellhost_destroys_total",
            "Cells destroyed with a clean TeardownReport.",
            c.destroys.load(Ordering::Relaxed),
        ),
        (
            "cellhost_dirty_teardowns_total",
            "Teardowns that left residue (retried by reconcile).",
            c.dirty_teardowns.load(Ordering::Relaxed),
        ),
        (
            "cellhost_leases_reaped_total",
            "Cells destroyed at lease expiry.",
            c.leases_reaped.load(Ordering::Relaxed),
        ),
        (
            "cellhost_orphans_destroyed_total",
            "Host objects without a record destroyed by reconcile.",
            c.orphans_destroyed.load(Ordering::Relaxed),
        ),
        (
            "cellhost_creates_rolled_back_total",
            "Interrupted creates rolled back by reconcile.",
            c.rolled_back.load(Ordering::Relaxed),
        ),
        (
            "cellhost_reconcile_passes_total",
            "Reconcile passes run.",
            c.reconcile_passes.load(Ordering::Relaxed),
        ),
        (
            "cellhost_reconcile_errors_total",
            "Errors met by reconcile.",
            c.reconcile_errors.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, v) in counters {
        family(&mut o, name, "counter", help);
        sample(&mut o, name, &[], v as f64);
    }
    family(
        &mut o,
        "cellhost_create_seconds_sum",
        "counter",
        "Total create-to-running time of successful creates.",
    );
    sample(
        &mut o,
        "cellhost_create_seconds_sum",
        &[],
        c.create_us_sum.load(Ordering::Relaxed) as f64 / 1e6,
    );
    let cap = sup.capacity();
    let res = sup.reserved();
    family(
        &mut o,
        "cellhost_capacity_cpus",
        "gauge",
        "CPUs cells may reserve (logical CPUs x overcommit).",
    );
    sample(&mut o, "cellhost_capacity_cpus", &[], cap.cpus);
    family(
        &mut o,
        "cellhost_reserved_cpus",
        "gauge",
        "CPUs reserved by cells.",
    );
    sample(&mut o, "cellhost_reserved_cpus", &[], res.cpus);
    family(
        &mut o,
        "cellhost_capacity_memory_bytes",
        "gauge",
        "Memory cells may reserve.",
    );
    sample(
        &mut o,
        "cellhost_capacity_memory_bytes",
        &[],
        cap.memory_bytes as f64,
    );
    family(
        &mut o,
        "cellhost_reserved_memory_bytes",
        "gauge",
        "Memory reserved by cells.",
    );
    sample(
        &mut o,
        "cellhost_reserved_memory_bytes",
        &[],
        res.memory_bytes as f64,
    );
    family(
        &mut o,
        "cellhost_uptime_seconds",
        "gauge",
        "Seconds since the supervisor started.",
    );
    sample(
        &mut o,
        "cellhost_uptime_seconds",
        &[],
        sup.uptime().as_secs_f64(),
    );
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
