//! `p2prig fuzz`: a stateful revoke fuzzer. Programs (`program`) are generated from a seed and
//! mutated from a corpus (`generate`), run on a booted rig (`exec`) and judged against a
//! reference model of the revoke semantics (`model`, `oracle`); a finding is minimised
//! (`minimise`), saved as a readable program in the run directory and replayable with
//! `--replay`. The campaign loop, its progress line and its results are `campaign`.

pub mod campaign;
pub mod command;
pub mod exec;
pub mod generate;
pub mod minimise;
pub mod model;
pub mod oracle;
pub mod program;
