//! `p2prig list`: the scenarios, what each checks, the kernel flavors and, per scenario,
//! flavor and variant, what is expected (with the defect and the checks it shows in); as text
//! for people and as JSON (`--json`) for CI summaries and users' tools.

use anyhow::Result;
use serde::Serialize;

use crate::build::kernel::{self, Variant};
use crate::run::checks::CheckId;
use crate::run::expectations::{self, Defect, Expect, Target};
use crate::scenarios::{Importer, SCENARIOS};

#[derive(Debug, Serialize)]
struct Listing {
    scenarios: Vec<ScenarioEntry>,
    flavors: Vec<FlavorEntry>,
    defects: Vec<&'static Defect>,
    checks: &'static [CheckId],
}

#[derive(Debug, Serialize)]
struct ScenarioEntry {
    name: &'static str,
    summary: &'static str,
    needs_debug: bool,
    importer: Importer,
    expectations: Vec<ExpectationEntry>,
}

#[derive(Debug, Serialize)]
struct ExpectationEntry {
    flavor: String,
    variant: &'static str,
    #[serde(flatten)]
    expect: Expect,
}

#[derive(Debug, Serialize)]
struct FlavorEntry {
    name: String,
    description: String,
}

fn listing() -> Result<Listing> {
    let loaded = expectations::get()?;
    let flavors = kernel::flavor_names()?;
    let scenarios = SCENARIOS
        .iter()
        .map(|s| ScenarioEntry {
            name: s.name,
            summary: s.summary,
            needs_debug: s.needs_debug,
            importer: s.importer,
            expectations: flavors
                .iter()
                .flat_map(|flavor| {
                    Variant::ALL.map(|variant| ExpectationEntry {
                        flavor: flavor.clone(),
                        variant: variant.name(),
                        expect: loaded.expect(
                            s.name,
                            Target {
                                flavor,
                                debug: variant == Variant::Debug,
                            },
                        ),
                    })
                })
                .collect(),
        })
        .collect();
    let flavors = flavors
        .into_iter()
        .map(|name| {
            let flavor = kernel::load_flavor(&name)?;
            Ok(FlavorEntry {
                name,
                description: flavor.description,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Listing {
        scenarios,
        flavors,
        defects: loaded.defects.clone(),
        checks: crate::run::checks::ALL,
    })
}

pub fn print(json: bool) -> Result<()> {
    let listing = listing()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    println!("scenarios (importer: rxe, iommufd, or - for none):");
    let width = listing
        .scenarios
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    for s in &listing.scenarios {
        println!(
            "  {:<width$} {:<8} {}",
            s.name,
            s.importer.name(),
            s.summary
        );
        for pair in s.expectations.chunks(2) {
            let [tiny, debug] = pair else { continue };
            if let Expect::Fail(why) = tiny.expect {
                println!(
                    "  {:<width$}   expected to fail on {}: {why}",
                    "", tiny.flavor
                );
            }
            if let (Expect::Fail(why), true) = (debug.expect, debug.expect != tiny.expect) {
                println!(
                    "  {:<width$}   expected to fail on {}:debug: {why}",
                    "", debug.flavor
                );
            }
        }
    }
    println!("kernel flavors (each FLAVOR:tiny or FLAVOR:debug):");
    for f in &listing.flavors {
        println!("  {:<12} {}", f.name, f.description);
    }
    println!("defects (kernel-patches/defects.toml):");
    for d in &listing.defects {
        match &d.fixed_by {
            Some(fix) => println!("  {:<12} {} (fixed by {fix})", d.id, d.title),
            None => println!("  {:<12} {} (no fix in kernel-patches)", d.id, d.title),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_listing_has_every_scenario_on_every_flavor_and_variant() -> Result<()> {
        let listing = listing()?;
        let value = serde_json::to_value(&listing)?;
        let scenarios = value["scenarios"].as_array().map_or(0, Vec::len);
        assert_eq!(scenarios, SCENARIOS.len());
        let flavors = kernel::flavor_names()?.len();
        let close = listing
            .scenarios
            .iter()
            .find(|s| s.name == "revoke-on-close")
            .map(|s| serde_json::to_value(&s.expectations))
            .transpose()?
            .unwrap_or_default();
        assert_eq!(close.as_array().map_or(0, Vec::len), flavors * 2);
        let v1_tiny = close
            .as_array()
            .and_then(|e| {
                e.iter()
                    .find(|e| e["flavor"] == "v1" && e["variant"] == "tiny")
            })
            .cloned()
            .unwrap_or_default();
        assert_eq!(v1_tiny["expect"], "fail");
        assert_eq!(v1_tiny["defect"]["id"], "close-order");
        assert_eq!(v1_tiny["defect"]["shows_as"][0], "guest-console-clean");
        Ok(())
    }
}
