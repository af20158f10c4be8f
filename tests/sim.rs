//! The simulated network's scenarios (issue 11): the real carousel, tracker, querier and
//! fetch state, joined through seeded in-memory links on a virtual clock. Each scenario
//! asserts and prints its report.

use lcfs::sim::{self, Loss, Report, Scenario, Shape};

fn run(s: &Scenario) -> Report {
    let dir = tempfile::tempdir().expect("a temporary directory for the tree");
    let r = sim::run(dir.path(), s).expect("the tree is built and published");
    println!("{r}");
    r
}

const FILE: Shape = Shape::File(4 << 20);

#[test]
fn smoke() {
    let s = Scenario::new("smoke", 1, FILE, 3, Loss::Uniform(0.05));
    let r = run(&s);
    assert_eq!(r.unfinished, 0);
}
