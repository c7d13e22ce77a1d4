//! 200 create/destroy cycles: zero residue every time, and no file
//! descriptor growth in this process. Its own test binary so no other test
//! opens or closes fds while it counts.

mod common;

use cellhost_core::Backend;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn two_hundred_cycles_leave_nothing() {
    require_process_tier!();
    let t = common::tier();
    let rt = common::rt();
    // Warm up once so lazily opened descriptors (runtime, probe) exist.
    rt.block_on(async {
        let (_, h) = t
            .create(common::cell("warm", "  command: [\"/bin/true\"]\n"), vec![])
            .await;
        assert!(t.backend.destroy(&h).await.unwrap().is_clean());
    });
    let before = open_fds();
    let cgroups_before =
        cellhost_process::hostfs::cell_cgroup_names(t.backend.cgroup_instance()).unwrap();
    rt.block_on(async {
        for i in 0..200 {
            let cell = common::cell(
                &format!("cycle{i}"),
                "  command: [\"/bin/true\"]\n  resources: { memoryMiB: 32, pids: 8, cpus: 0.5 }\n",
            );
            let (_, h) = t.create(cell, vec![]).await;
            t.backend.start(&h).await.unwrap();
            let report = t.backend.destroy(&h).await.unwrap();
            assert!(report.is_clean(), "cycle {i}: {}", report.summary());
        }
    });
    let after = open_fds();
    assert_eq!(before, after, "fd count grew over 200 cycles");
    let cells = std::fs::read_dir(t.backend.state_dir().join("cells"))
        .unwrap()
        .count();
    assert_eq!(cells, 0, "cell dirs left behind");
    let names: Vec<String> =
        cellhost_process::hostfs::cell_cgroup_names(t.backend.cgroup_instance())
            .unwrap()
            .into_iter()
            .filter(|n| !cgroups_before.contains(n))
            .collect();
    assert!(names.is_empty(), "cgroups left: {names:?}");
}
