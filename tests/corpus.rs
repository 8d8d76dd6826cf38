//! Replays the fuzz corpus and every recorded crash (tools/fuzz/corpus and
//! tools/fuzz/regressions, one folder per target) through the decoders'
//! invariant checks, on stable, in the normal test run.

use corerelay::protocol::check::TARGETS;

#[test]
fn every_corpus_and_regression_file_holds_the_invariants() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fuzz");
    let mut ran = 0;
    for (name, check) in TARGETS {
        for dir in ["corpus", "regressions"] {
            let Ok(files) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for f in files.flatten() {
                let data = std::fs::read(f.path()).expect("corpus file");
                let r = std::panic::catch_unwind(|| check(&data));
                assert!(
                    r.is_ok(),
                    "{name}: {} breaks an invariant",
                    f.path().display()
                );
                ran += 1;
            }
        }
    }
    for (name, _) in TARGETS {
        assert!(
            root.join("corpus").join(name).is_dir(),
            "a corpus for every target: {name}"
        );
    }
    assert!(ran >= TARGETS.len(), "{ran} files");
}
