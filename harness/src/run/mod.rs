//! Running scenarios and reporting: the plan runner, check names and expectations (data), verdicts, the terminal/JUnit/JSON/HTML reports, `list` and `bench`.

pub mod bench;
pub mod checks;
pub mod expectations;
pub mod github;
pub mod html;
pub mod ktap;
pub mod list;
pub mod merge;
pub mod outputs;
pub mod report;
pub mod runner;
