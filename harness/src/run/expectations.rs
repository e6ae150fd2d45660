//! What each scenario is expected to do on each kernel, as data: the known defects are declared
//! once in kernel-patches/defects.toml, and each flavor's TOML lists the scenarios it is
//! expected to fail with the defect that makes them fail. Everything is validated when loaded:
//! an unknown defect, scenario, variant or check is an error naming the file and the entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::run::checks::CheckId;
use crate::scenarios::{glob_match, Scenario, SCENARIOS};

/// A known defect, from kernel-patches/defects.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Defect {
    /// B1..B5 for the seed's, U1, U2 for those p2prig found upstream, a short name otherwise.
    pub id: String,
    pub title: String,
    /// What goes wrong in the kernel and what an importer sees.
    pub mechanism: String,
    /// The checks whose failure is this defect; a scenario that fails only elsewhere (a harness
    /// error, another defect) did not reproduce it.
    pub shows_in: Vec<CheckId>,
    /// The patch that fixes it (relative to kernel-patches/), if there is one.
    pub fixed_by: Option<String>,
}

impl std::fmt::Display for Defect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.id, self.title)
    }
}

/// A scenario expected to fail on a kernel: the defect, and the checks it shows in there (the
/// defect's own, or the subset the flavor file names for that scenario). Serialized as the
/// defect's id and title with these checks (`p2prig list --json` has the whole defect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedFailure {
    pub defect: &'static Defect,
    pub shows_as: &'static [CheckId],
}

impl Serialize for ExpectedFailure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown<'a> {
            id: &'a str,
            title: &'a str,
            shows_as: &'a [CheckId],
        }
        Shown {
            id: &self.defect.id,
            title: &self.defect.title,
            shows_as: self.shows_as,
        }
        .serialize(s)
    }
}

/// Read back from a results.json (`p2prig report`, `p2prig merge`): the defect by id from this
/// p2prig's defects.toml, its checks as one of the sets the data declares for it.
impl<'de> Deserialize<'de> for ExpectedFailure {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Stored {
            id: String,
            shows_as: Vec<CheckId>,
        }
        let stored = Stored::deserialize(d)?;
        get()
            .and_then(|expectations| expectations.declared_failure(&stored.id, &stored.shows_as))
            .map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl std::fmt::Display for ExpectedFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.defect.fmt(f)
    }
}

/// What a scenario is expected to do on a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "expect", content = "defect", rename_all = "snake_case")]
pub enum Expect {
    Pass,
    /// Expected to fail, reproducing a known defect.
    Fail(ExpectedFailure),
}

/// The kernel an expectation is about: its flavor ("byo" for a user's kernel, expected to keep
/// every guarantee) and whether it is a debug build (some defects only show in KASAN, lockdep
/// or kmemleak reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub flavor: &'a str,
    pub debug: bool,
}

/// One `[[expected_failure]]` entry of a flavor file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureEntry {
    /// Scenario names or globs (`revoke-on-*`).
    pub scenarios: Vec<String>,
    /// A defect id from kernel-patches/defects.toml.
    pub defect: String,
    /// "tiny", "debug" or absent (both variants).
    #[serde(default)]
    pub variant: Option<String>,
    /// The checks it shows in on these scenarios: a subset of the defect's (default: all).
    #[serde(default)]
    pub checks: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefectEntry {
    title: String,
    mechanism: String,
    #[serde(default)]
    shows_in: Vec<String>,
    #[serde(default)]
    fixed_by: Option<String>,
}

/// Every expectation, loaded and validated.
#[derive(Debug)]
pub struct Expectations {
    pub defects: Vec<&'static Defect>,
    /// (flavor, scenario, debug) -> expected failure.
    failures: BTreeMap<(String, &'static str, bool), ExpectedFailure>,
}

impl Expectations {
    /// The expected failure of defect `id` showing in `shows_as`, as declared by
    /// defects.toml or a flavor file (results from another p2prig version may name others).
    pub fn declared_failure(&self, id: &str, shows_as: &[CheckId]) -> Result<ExpectedFailure> {
        let Some(defect) = self.defects.iter().copied().find(|d| d.id == id) else {
            bail!(
                "the results name defect `{id}`, which kernel-patches/defects.toml does not \
                 declare: read them with the p2prig version that wrote them"
            );
        };
        if defect.shows_in == shows_as {
            return Ok(ExpectedFailure {
                defect,
                shows_as: &defect.shows_in,
            });
        }
        self.failures
            .values()
            .find(|f| f.defect.id == id && f.shows_as == shows_as)
            .copied()
            .with_context(|| {
                format!(
                    "the results expect defect `{id}` in checks {shows_as:?}, which no flavor \
                     file declares: read them with the p2prig version that wrote them"
                )
            })
    }

    /// What `scenario` is expected to do on `target`: pass unless a flavor file says otherwise.
    pub fn expect(&self, scenario: &str, target: Target) -> Expect {
        self.failures
            .iter()
            .find(|((flavor, name, debug), _)| {
                flavor == target.flavor && *name == scenario && *debug == target.debug
            })
            .map_or(Expect::Pass, |(_, f)| Expect::Fail(*f))
    }

    /// Parses the defects file and each flavor's expected failures against the scenario
    /// registry and the check names. `flavors` is (flavor name, its file, its entries).
    pub fn parse(
        defects_path: &Path,
        defects_text: &str,
        flavors: &[(String, PathBuf, Vec<FailureEntry>)],
        scenarios: &[Scenario],
    ) -> Result<Self> {
        let raw: BTreeMap<String, DefectEntry> = toml::from_str(defects_text)
            .with_context(|| format!("parsing {}", defects_path.display()))?;
        let patches = defects_path.parent().unwrap_or(Path::new("."));
        let mut defects = Vec::new();
        for (id, entry) in raw {
            if let Some(fix) = &entry.fixed_by {
                if !patches.join(fix).is_file() {
                    bail!(
                        "{}: defect {id}: fixed_by `{fix}` is no file under {}",
                        defects_path.display(),
                        patches.display()
                    );
                }
            }
            let shows_in = entry
                .shows_in
                .iter()
                .map(|c| check_named(c, defects_path, &format!("defect {id}")))
                .collect::<Result<Vec<_>>>()?;
            let defect: &'static Defect = Box::leak(Box::new(Defect {
                id,
                title: entry.title,
                mechanism: entry
                    .mechanism
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                shows_in,
                fixed_by: entry.fixed_by,
            }));
            defects.push(defect);
        }
        let mut failures = BTreeMap::new();
        for (flavor, path, entries) in flavors {
            for (i, entry) in entries.iter().enumerate() {
                let at = format!("{}, expected_failure #{}", path.display(), i + 1);
                let Some(defect) = defects.iter().copied().find(|d| d.id == entry.defect) else {
                    bail!(
                        "{at}: unknown defect `{}`; known: {} (declare it in {})",
                        entry.defect,
                        defects
                            .iter()
                            .map(|d| d.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        defects_path.display()
                    );
                };
                let shows_as: &'static [CheckId] = match &entry.checks {
                    None => &defect.shows_in,
                    Some(names) => {
                        let mut checks = Vec::new();
                        for name in names {
                            let check = check_named(name, path, &at)?;
                            if !defect.shows_in.contains(&check) {
                                bail!(
                                    "{at}: check `{name}` is not one defect {} shows in ({}); \
                                     add it to the defect's shows_in in {} or drop it here",
                                    defect.id,
                                    join(&defect.shows_in),
                                    defects_path.display()
                                );
                            }
                            checks.push(check);
                        }
                        Box::leak(checks.into_boxed_slice())
                    }
                };
                if shows_as.is_empty() {
                    bail!(
                        "{at}: defect {} shows in no check, so no failure could reproduce it; \
                         give it shows_in in {}",
                        defect.id,
                        defects_path.display()
                    );
                }
                let debugs: &[bool] = match entry.variant.as_deref() {
                    None => &[false, true],
                    Some("tiny") => &[false],
                    Some("debug") => &[true],
                    Some(other) => bail!(
                        "{at}: unknown variant `{other}` (tiny, debug, or leave it out for both)"
                    ),
                };
                for pattern in &entry.scenarios {
                    let matched: Vec<&Scenario> = scenarios
                        .iter()
                        .filter(|s| glob_match(pattern, s.name))
                        .collect();
                    if matched.is_empty() {
                        bail!(
                            "{at}: scenario `{pattern}` matches no scenario; known: {}",
                            scenarios
                                .iter()
                                .map(|s| s.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                    for s in matched {
                        for &debug in debugs {
                            let key = (flavor.clone(), s.name, debug);
                            if let Some(before) =
                                failures.insert(key, ExpectedFailure { defect, shows_as })
                            {
                                bail!(
                                    "{at}: scenario {} on {flavor}:{} is already expected to fail with {}; \
                                     one expected failure per scenario and variant",
                                    s.name,
                                    if debug { "debug" } else { "tiny" },
                                    before.defect.id
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(Self { defects, failures })
    }

    /// The repository's defects file and every flavor's expected failures.
    pub fn load() -> Result<Self> {
        let root = crate::rig::paths::project_root().join("kernel-patches");
        let defects_path = root.join("defects.toml");
        let text = std::fs::read_to_string(&defects_path)
            .with_context(|| format!("reading {}", defects_path.display()))?;
        let mut flavors = Vec::new();
        for name in crate::build::kernel::flavor_names()? {
            let flavor = crate::build::kernel::load_flavor(&name)?;
            let path = root.join("flavors").join(format!("{name}.toml"));
            flavors.push((name, path, flavor.expected_failure));
        }
        Self::parse(&defects_path, &text, &flavors, SCENARIOS)
    }
}

/// The repository's expectations, loaded once per process (`p2prig run` and `list` load them
/// first, so a bad file stops them before any build).
pub fn get() -> Result<&'static Expectations> {
    static LOADED: OnceLock<Expectations> = OnceLock::new();
    if let Some(loaded) = LOADED.get() {
        return Ok(loaded);
    }
    let loaded = Expectations::load()?;
    Ok(LOADED.get_or_init(|| loaded))
}

/// An expected failure of a made-up defect, for tests of judging and reporting.
#[cfg(test)]
pub fn test_failure(id: &str, shows_as: &'static [CheckId]) -> ExpectedFailure {
    ExpectedFailure {
        defect: Box::leak(Box::new(Defect {
            id: id.into(),
            title: "a test defect".into(),
            mechanism: String::new(),
            shows_in: shows_as.to_vec(),
            fixed_by: None,
        })),
        shows_as,
    }
}

fn check_named(name: &str, file: &Path, at: &str) -> Result<CheckId> {
    CheckId::named(name).with_context(|| {
        format!(
            "{}: {at}: unknown check `{name}` (`p2prig list --json` and harness/src/checks.rs \
             list every check)",
            file.display()
        )
    })
}

fn join(checks: &[CheckId]) -> String {
    checks
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFECTS: &str = r#"
[B1]
title = "inverted revoke flag"
mechanism = "resets revoke nothing"
shows_in = ["write-in-window-gets-remote-access-error", "importer-undisturbed"]
"#;

    fn parse(flavor_toml: &str) -> Result<Expectations> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            expected_failure: Vec<FailureEntry>,
        }
        let file: File = toml::from_str(flavor_toml)?;
        Expectations::parse(
            Path::new("defects.toml"),
            DEFECTS,
            &[(
                "mine".into(),
                PathBuf::from("flavors/mine.toml"),
                file.expected_failure,
            )],
            SCENARIOS,
        )
    }

    fn error(flavor_toml: &str) -> String {
        parse(flavor_toml)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    }

    #[test]
    fn a_flavor_expects_failures_by_glob_and_variant_and_passes_elsewhere() {
        let e = parse(
            r#"
[[expected_failure]]
scenarios = ["revoke-on-*-reset"]
defect = "B1"
checks = ["write-in-window-gets-remote-access-error"]
variant = "debug"
"#,
        )
        .expect("valid");
        let debug = Target {
            flavor: "mine",
            debug: true,
        };
        let tiny = Target {
            flavor: "mine",
            debug: false,
        };
        let Expect::Fail(f) = e.expect("revoke-on-vfio-reset", debug) else {
            panic!("expected to fail on debug");
        };
        assert_eq!(f.defect.id, "B1");
        assert_eq!(
            f.shows_as,
            [crate::run::checks::WRITE_IN_WINDOW_GETS_REMOTE_ACCESS_ERROR]
        );
        assert_eq!(e.expect("revoke-on-hot-reset", debug), Expect::Fail(f));
        assert_eq!(e.expect("revoke-on-vfio-reset", tiny), Expect::Pass);
        assert_eq!(e.expect("revoke-on-flr", debug), Expect::Pass);
        assert_eq!(
            e.expect(
                "revoke-on-vfio-reset",
                Target {
                    flavor: "other",
                    debug: true
                }
            ),
            Expect::Pass
        );
    }

    #[test]
    fn bad_entries_are_errors_naming_the_file_and_the_entry() {
        let unknown_defect =
            error("[[expected_failure]]\nscenarios = [\"smoke\"]\ndefect = \"B9\"\n");
        assert!(
            unknown_defect.contains("flavors/mine.toml, expected_failure #1"),
            "{unknown_defect}"
        );
        assert!(
            unknown_defect.contains("unknown defect `B9`; known: B1"),
            "{unknown_defect}"
        );
        let unknown_scenario =
            error("[[expected_failure]]\nscenarios = [\"smok\"]\ndefect = \"B1\"\n");
        assert!(
            unknown_scenario.contains("`smok` matches no scenario"),
            "{unknown_scenario}"
        );
        let unknown_check = error(
            "[[expected_failure]]\nscenarios = [\"smoke\"]\ndefect = \"B1\"\nchecks = [\"write-lands\"]\n",
        );
        assert!(
            unknown_check.contains("unknown check `write-lands`"),
            "{unknown_check}"
        );
        let foreign_check = error(
            "[[expected_failure]]\nscenarios = [\"smoke\"]\ndefect = \"B1\"\nchecks = [\"kmemleak-finds-nothing\"]\n",
        );
        assert!(
            foreign_check.contains("not one defect B1 shows in"),
            "{foreign_check}"
        );
        let variant = error(
            "[[expected_failure]]\nscenarios = [\"smoke\"]\ndefect = \"B1\"\nvariant = \"big\"\n",
        );
        assert!(variant.contains("unknown variant `big`"), "{variant}");
        let twice = error(
            "[[expected_failure]]\nscenarios = [\"smoke\"]\ndefect = \"B1\"\n\
             [[expected_failure]]\nscenarios = [\"s*\"]\ndefect = \"B1\"\n",
        );
        assert!(
            twice.contains("expected_failure #2: scenario smoke on mine:tiny is already"),
            "{twice}"
        );
        let typo = error("[[expected_failure]]\nscenario = [\"smoke\"]\ndefect = \"B1\"\n");
        assert!(typo.contains("unknown field `scenario`"), "{typo}");
    }

    #[test]
    fn a_defect_naming_an_unknown_check_is_an_error_naming_it() {
        let err = Expectations::parse(
            Path::new("defects.toml"),
            "[X]\ntitle = \"t\"\nmechanism = \"m\"\nshows_in = [\"nope\"]\n",
            &[],
            SCENARIOS,
        )
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(
            err.contains("defects.toml: defect X: unknown check `nope`"),
            "{err}"
        );
    }

    #[test]
    fn the_repositorys_files_load_and_bind_each_defect_where_it_shows() {
        let e =
            Expectations::load().expect("kernel-patches/defects.toml and the flavors are valid");
        let on = |scenario, flavor, debug| e.expect(scenario, Target { flavor, debug });
        let id = |x: Expect| match x {
            Expect::Fail(f) => f.defect.id.clone(),
            Expect::Pass => "pass".into(),
        };
        assert_eq!(id(on("revoke-on-hot-reset", "upstream", true)), "U2");
        assert_eq!(id(on("revoke-on-hot-reset", "upstream", false)), "pass");
        assert_eq!(
            id(on("revoke-on-hot-reset", "upstream-fixed", true)),
            "pass"
        );
        assert_eq!(id(on("revoke-on-hot-reset", "v1", false)), "B1");
        assert_eq!(id(on("map-leak", "upstream", true)), "U1");
        assert_eq!(id(on("export-args", "v1-fixed", false)), "B4");
        assert_eq!(id(on("smoke", "byo", true)), "pass");
    }
}
