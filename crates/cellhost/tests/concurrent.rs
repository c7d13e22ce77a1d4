//! Cells created and started from several threads at once each run their
//! own workload, exactly once. (Regression: libcontainer's start `chdir`s,
//! and the working directory is process-wide; concurrent starts signalled
//! each other's cells.)

mod common;

use std::time::Duration;

use cellhost_core::Backend;

#[test]
fn concurrent_starts_start_their_own_cells() {
    require_process_tier!();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let tier = common::tier();
                common::rt().block_on(async {
                    for i in 0..25 {
                        let name = format!("c{t}x{i}");
                        let cell = common::cell(
                            &name,
                            &format!("  command: [\"/bin/echo\", \"{name}\"]\n"),
                        );
                        let (_, h) = tier.create(cell, vec![]).await;
                        tier.backend.start(&h).await.expect("start");
                        let st = tier.wait_exit(&h, Duration::from_secs(20)).await;
                        assert_eq!(st.exit.and_then(|e| e.code), Some(0), "{name} did not run");
                        assert_eq!(tier.log(&h).await, format!("{name}\n"));
                        let report = tier.backend.destroy(&h).await.unwrap();
                        assert!(report.is_clean(), "{name}: {}", report.summary());
                    }
                });
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a worker failed");
    }
}
