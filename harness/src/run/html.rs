//! The self-contained HTML report: the scenario x flavor table, then per scenario its checks
//! and an inline SVG timeline with lanes for guest operations (agent RPCs), target operations
//! and device events; reset and decode-off windows shaded, violations in red, a hover title
//! on every mark. No scripts, no external fonts or styles.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use serde_json::Value;

use crate::run::report::{RunReport, ScenarioResult};
use crate::scenarios::{Expect, Verdict};

const WIDTH: f64 = 960.0;
/// What the timeline's colours mean; every mark's hover title has the details.
const LEGEND: &str = "<p class=\"legend\"><span style=\"color:#5b8dd6\">&#9632;</span> request \
    that succeeded (ACK) <span style=\"color:#d98c1f\">&#9632;</span> request that failed or was \
    NAKed <span style=\"color:#2a2a2a\">&#9679;</span> device event \
    <span style=\"color:#d01010\">&#9679;</span> access during a revoke (violation) \
    <span style=\"color:#f5d0a0\">&#9632;</span> reset or decode-off window</p>\n";
const LEFT: f64 = 90.0;
const LANE_HEIGHT: f64 = 34.0;

/// A mark on the timeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Mark {
    /// An operation from `start_ns` to `end_ns` (agent RPC, target operation).
    Span {
        lane: Lane,
        start_ns: u64,
        end_ns: u64,
        label: String,
        ok: bool,
    },
    /// A device event at one instant.
    Point {
        lane: Lane,
        at_ns: u64,
        label: String,
        violation: bool,
    },
    /// A window during which importers must have no access (reset, decode off).
    Window {
        start_ns: u64,
        end_ns: u64,
        label: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Guest,
    Target,
    Device,
}

impl Lane {
    fn index(self) -> f64 {
        match self {
            Lane::Guest => 0.0,
            Lane::Target => 1.0,
            Lane::Device => 2.0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Lane::Guest => "guest",
            Lane::Target => "target",
            Lane::Device => "device",
        }
    }
}

pub fn write(report: &RunReport, path: &Path) -> Result<()> {
    std::fs::write(path, render(report))
        .with_context(|| format!("writing the HTML report {}", path.display()))
}

pub fn render(report: &RunReport) -> String {
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>p2prig report</title>\n<style>\
         body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}\
         td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left;font-size:90%}\
         .pass{background:#d8f0d8}.expected_fail{background:#fbeec4}.mismatch{background:#f6c6c6}.skipped{background:#e4e4e4}\
         .ok{color:#1a7f1a}.bad{color:#b00}section{margin:1.5em 0;border-top:1px solid #ccc}\
         pre{white-space:pre-wrap;font-size:85%;margin:0}.legend{font-size:80%;color:#555}</style></head><body>\n<h1>p2prig report</h1>\n",
    );
    html.push_str(&summary_table(report));
    for result in &report.results {
        html.push_str(&section(result));
    }
    html.push_str("</body></html>\n");
    html
}

fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::ExpectedFail => "expected_fail",
        Verdict::Mismatch => "mismatch",
        Verdict::Skipped => "skipped",
    }
}

fn summary_table(report: &RunReport) -> String {
    let (flavors, scenarios) = report.axes();
    let mut out = String::from("<table><tr><th>scenario</th>");
    for f in &flavors {
        let _ = write!(out, "<th>{}</th>", esc(f));
    }
    out.push_str("</tr>\n");
    for s in &scenarios {
        let _ = write!(out, "<tr><td>{}</td>", esc(s));
        for f in &flavors {
            match report.result(s, f) {
                Some(r) => {
                    let _ = write!(
                        out,
                        "<td class=\"{}\"><a href=\"#{}\">{}</a></td>",
                        verdict_class(r.verdict),
                        anchor(r),
                        r.verdict.label()
                    );
                }
                None => out.push_str("<td>-</td>"),
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

fn anchor(r: &ScenarioResult) -> String {
    format!("{}--{}", r.scenario, r.flavor)
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
}

fn section(r: &ScenarioResult) -> String {
    let mut out = format!(
        "<section id=\"{}\"><h2>{} on {} <span class=\"{}\">{}</span></h2>\n",
        anchor(r),
        esc(&r.scenario),
        esc(&r.flavor),
        verdict_class(r.verdict),
        r.verdict.label()
    );
    match r.expect {
        Expect::Pass => out.push_str("<p>Expected to pass.</p>\n"),
        Expect::Fail(why) => {
            let shows_as: Vec<&str> = why.shows_as.iter().map(|c| c.as_str()).collect();
            let _ = writeln!(
                out,
                "<p>Expected to fail: {}. {} (shows in {})</p>",
                esc(&why.to_string()),
                esc(&why.defect.mechanism),
                esc(&shows_as.join(", "))
            );
        }
    }
    out.push_str("<table><tr><th>check</th><th>result</th><th>detail</th></tr>\n");
    for c in &r.checks {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td><pre>{}</pre></td></tr>",
            esc(c.name.as_str()),
            if c.passed { "ok" } else { "bad" },
            if c.passed { "PASS" } else { "FAIL" },
            esc(&c.detail)
        );
    }
    out.push_str("</table>\n");
    let marks = marks_for(r);
    out.push_str(&timeline_svg(&marks, r.start_ns, r.end_ns));
    out.push_str(LEGEND);
    let _ = writeln!(
        out,
        "<p>Run directory: <code>{}</code></p></section>",
        esc(&r.run_dir.display().to_string())
    );
    out
}

/// The marks of one scenario, read from its boot directory's agent and roce-target
/// transcripts and the device trace.
fn marks_for(r: &ScenarioResult) -> Vec<Mark> {
    let read = |name: &str| std::fs::read_to_string(r.run_dir.join(name)).unwrap_or_default();
    let mut marks = rpc_marks(&read("agent.transcript"), Lane::Guest, r.start_ns, r.end_ns);
    marks.extend(rpc_marks(
        &read("roce-target.transcript"),
        Lane::Target,
        r.start_ns,
        r.end_ns,
    ));
    marks.extend(device_marks(
        &read("nvme-cmb.trace.jsonl"),
        r.start_ns,
        r.end_ns,
    ));
    marks
}

/// Requests (agent or roce-target) as spans: a "send" line opens one, the "recv" with the
/// same id closes it. A failed request, or a target poll that returned a NAKed or failed
/// completion, is drawn as not ok, with the syndrome in its title.
pub fn rpc_marks(transcript: &str, lane: Lane, start_ns: u64, end_ns: u64) -> Vec<Mark> {
    let mut open: Vec<(u64, u64, String)> = Vec::new();
    let mut marks = Vec::new();
    for line in transcript.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let at = entry["mono_ns"].as_u64().unwrap_or(0);
        let msg = &entry["msg"];
        let id = msg["id"].as_u64().unwrap_or(0);
        match entry["dir"].as_str() {
            Some("send") => open.push((id, at, op_label(msg))),
            Some("recv") => {
                if let Some(pos) = open.iter().position(|(i, _, _)| *i == id) {
                    let (_, sent, label) = open.remove(pos);
                    if sent >= start_ns && sent <= end_ns {
                        let (label, ok) = match msg.get("ok") {
                            Some(reply) => match completions_label(reply) {
                                Some((outcome, all_acked)) => {
                                    (format!("{label} -> {outcome}"), all_acked)
                                }
                                None => (label, true),
                            },
                            None => (format!("{label} -> errno {}", msg["err"]["errno"]), false),
                        };
                        marks.push(Mark::Span {
                            lane,
                            start_ns: sent,
                            end_ns: at,
                            label,
                            ok,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    marks
}

/// For a roce-target poll reply: each completion as ACK or NAK with its syndrome, and
/// whether all of them succeeded.
fn completions_label(reply: &Value) -> Option<(String, bool)> {
    let completions = reply.get("completions")?.as_array()?;
    if completions.is_empty() {
        return Some(("no completion".into(), true));
    }
    let mut all_acked = true;
    let parts: Vec<String> = completions
        .iter()
        .map(|c| {
            let status = c["status"].as_str().unwrap_or("?");
            let what = format!("wr {} {}", c["wr_id"], c["opcode"].as_str().unwrap_or("?"));
            if status == "success" {
                format!("ACK {what}")
            } else {
                all_acked = false;
                match c["nak_code"].as_u64() {
                    Some(code) => format!("NAK {code:#04x} {what} ({status})"),
                    None => format!("{status} {what}"),
                }
            }
        })
        .collect();
    Some((parts.join(", "), all_acked))
}

fn op_label(msg: &Value) -> String {
    let mut label = msg["op"].as_str().unwrap_or("?").to_string();
    if let Some(obj) = msg.as_object() {
        for (k, v) in obj {
            if k != "id" && k != "op" {
                let _ = write!(label, " {k}={v}");
            }
        }
    }
    label
}

/// Device events as points; reset and decode-off intervals as windows.
pub fn device_marks(trace: &str, start_ns: u64, end_ns: u64) -> Vec<Mark> {
    let mut marks = Vec::new();
    let mut reset_since: Option<(u64, String)> = None;
    let mut decode_off_since: Option<u64> = None;
    for line in trace.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let at = event["mono_ns"].as_u64().unwrap_or(0);
        if at > end_ns {
            break;
        }
        let kind = event["kind"].as_str().unwrap_or("?");
        match kind {
            "reset_start" => {
                reset_since = Some((at, event["cause"].as_str().unwrap_or("reset").to_string()))
            }
            "reset_end" => {
                if let Some((since, cause)) = reset_since.take() {
                    if at >= start_ns {
                        marks.push(Mark::Window {
                            start_ns: since.max(start_ns),
                            end_ns: at,
                            label: format!("reset ({cause})"),
                        });
                    }
                }
            }
            "decode" => match (event["enabled"].as_bool(), decode_off_since) {
                (Some(false), None) => decode_off_since = Some(at),
                (Some(true), Some(since)) => {
                    decode_off_since = None;
                    if at >= start_ns {
                        marks.push(Mark::Window {
                            start_ns: since.max(start_ns),
                            end_ns: at,
                            label: "memory decode off".into(),
                        });
                    }
                }
                _ => {}
            },
            _ => {}
        }
        if at >= start_ns
            && matches!(
                kind,
                "bar" | "violation" | "config_write" | "reset_start" | "reset_end" | "decode"
            )
        {
            marks.push(Mark::Point {
                lane: Lane::Device,
                at_ns: at,
                label: event_label(&event),
                violation: kind == "violation",
            });
        }
    }
    if let Some(since) = decode_off_since.filter(|s| *s <= end_ns) {
        marks.push(Mark::Window {
            start_ns: since.max(start_ns),
            end_ns,
            label: "memory decode off".into(),
        });
    }
    marks
}

fn event_label(event: &Value) -> String {
    let mut label = format!(
        "#{} {}",
        event["seq"],
        event["kind"].as_str().unwrap_or("?")
    );
    for key in [
        "reason", "access", "bar", "offset", "size", "value", "cause", "enabled",
    ] {
        if let Some(v) = event.get(key).filter(|v| !v.is_null()) {
            match (key, v.as_u64()) {
                ("offset", Some(n)) => {
                    let _ = write!(label, " offset={n:#x}");
                }
                _ => {
                    let _ = write!(label, " {key}={v}");
                }
            }
        }
    }
    label
}

pub fn timeline_svg(marks: &[Mark], start_ns: u64, end_ns: u64) -> String {
    let span = end_ns.saturating_sub(start_ns).max(1) as f64;
    let x =
        |t: u64| LEFT + (t.saturating_sub(start_ns) as f64 / span).min(1.0) * (WIDTH - LEFT - 10.0);
    let height = 3.0 * LANE_HEIGHT + 24.0;
    let mut svg = format!(
        "<svg class=\"timeline\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\">\n"
    );
    for mark in marks {
        if let Mark::Window {
            start_ns: s,
            end_ns: e,
            label,
        } = mark
        {
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"0\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#f5d0a0\" opacity=\"0.55\"><title>{}</title></rect>",
                x(*s),
                (x(*e) - x(*s)).max(1.0),
                3.0 * LANE_HEIGHT,
                esc(label)
            );
        }
    }
    for lane in [Lane::Guest, Lane::Target, Lane::Device] {
        let y = lane.index() * LANE_HEIGHT + LANE_HEIGHT / 2.0;
        let _ = writeln!(
            svg,
            "<text x=\"4\" y=\"{:.1}\" font-size=\"12\">{}</text><line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ccc\"/>",
            y + 4.0,
            lane.name(),
            WIDTH - 10.0
        );
    }
    for mark in marks {
        match mark {
            Mark::Span {
                lane,
                start_ns: s,
                end_ns: e,
                label,
                ok,
            } => {
                let y = lane.index() * LANE_HEIGHT + 8.0;
                let _ = writeln!(
                    svg,
                    "<rect class=\"op\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}</title></rect>",
                    x(*s),
                    (x(*e) - x(*s)).max(2.0),
                    LANE_HEIGHT - 16.0,
                    if *ok { "#5b8dd6" } else { "#d98c1f" },
                    esc(label)
                );
            }
            Mark::Point {
                lane,
                at_ns,
                label,
                violation,
            } => {
                let cx = x(*at_ns);
                let cy = lane.index() * LANE_HEIGHT + LANE_HEIGHT / 2.0;
                let _ = writeln!(
                    svg,
                    "<circle class=\"{}\" cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"{}\" fill=\"{}\"><title>{}</title></circle>",
                    if *violation { "violation" } else { "event" },
                    if *violation { 6 } else { 4 },
                    if *violation { "#d01010" } else { "#2a2a2a" },
                    esc(label)
                );
            }
            Mark::Window { .. } => {}
        }
    }
    let _ = writeln!(
        svg,
        "<text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"11\">0 ms</text><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{:.1} ms</text></svg>",
        height - 6.0,
        WIDTH - 10.0,
        height - 6.0,
        span / 1e6
    );
    svg
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSCRIPT: &str = r#"{"mono_ns":1000,"dir":"send","msg":{"id":1,"op":"bar_write","bar":0,"offset":4096}}
{"mono_ns":3000,"dir":"recv","msg":{"id":1,"ok":{"type":"done"}}}
{"mono_ns":4000,"dir":"send","msg":{"id":2,"op":"dmabuf_export","bar":0}}
{"mono_ns":5000,"dir":"recv","msg":{"id":2,"err":{"errno":22,"message":"x"}}}
"#;

    const TARGET_TRANSCRIPT: &str = r#"{"mono_ns":2000,"dir":"send","msg":{"id":1,"op":"post_write","qpn":17,"wr_id":2}}
{"mono_ns":2100,"dir":"recv","msg":{"id":1,"ok":{"type":"done"}}}
{"mono_ns":2200,"dir":"send","msg":{"id":2,"op":"poll_cq","qpn":17,"max":1,"wait_ms":5000}}
{"mono_ns":2700,"dir":"recv","msg":{"id":2,"ok":{"type":"completions","completions":[{"qpn":17,"wr_id":2,"opcode":"write","status":"remote_access_error","nak_code":98,"byte_len":0}]}}}
{"mono_ns":7000,"dir":"send","msg":{"id":3,"op":"poll_cq","qpn":18,"max":1,"wait_ms":5000}}
{"mono_ns":7300,"dir":"recv","msg":{"id":3,"ok":{"type":"completions","completions":[{"qpn":18,"wr_id":3,"opcode":"write","status":"success","byte_len":8}]}}}
"#;

    const TRACE: &str = r#"{"seq":1,"mono_ns":500,"generation":0,"kind":"bar","access":"write","bar":0,"offset":20,"size":4,"value":1}
{"seq":2,"mono_ns":2000,"generation":0,"kind":"bar","access":"write","bar":0,"offset":4096,"size":4,"value":5}
{"seq":3,"mono_ns":2500,"generation":0,"kind":"reset_start","cause":"flr"}
{"seq":4,"mono_ns":2600,"generation":0,"kind":"violation","reason":"in_reset:flr","access":"write","bar":0,"offset":4096,"size":4,"value":5}
{"seq":5,"mono_ns":2900,"generation":1,"kind":"reset_end","cause":"flr"}
{"seq":6,"mono_ns":9000,"generation":1,"kind":"bar","access":"read","bar":0,"offset":28,"size":4,"value":1}
"#;

    #[test]
    fn rpc_spans_pair_requests_with_replies_inside_the_window() {
        let marks = rpc_marks(TRANSCRIPT, Lane::Guest, 0, 10_000);
        assert_eq!(marks.len(), 2);
        assert!(
            matches!(&marks[0], Mark::Span { start_ns: 1000, end_ns: 3000, ok: true, label, .. } if label.starts_with("bar_write"))
        );
        assert!(
            matches!(&marks[1], Mark::Span { ok: false, label, .. } if label.contains("errno 22"))
        );
        assert_eq!(
            rpc_marks(TRANSCRIPT, Lane::Guest, 3500, 10_000).len(),
            1,
            "a request sent before the window is not this scenario's"
        );
    }

    #[test]
    fn target_polls_show_ack_and_nak_with_the_syndrome() {
        let marks = rpc_marks(TARGET_TRANSCRIPT, Lane::Target, 0, 10_000);
        assert_eq!(marks.len(), 3);
        assert!(
            matches!(&marks[1], Mark::Span { lane: Lane::Target, ok: false, label, .. }
                if label.ends_with("-> NAK 0x62 wr 2 write (remote_access_error)")),
            "{marks:?}"
        );
        assert!(
            matches!(&marks[2], Mark::Span { ok: true, label, .. } if label.ends_with("-> ACK wr 3 write")),
            "{marks:?}"
        );
    }

    #[test]
    fn device_events_in_the_window_become_points_and_resets_windows() {
        let marks = device_marks(TRACE, 1000, 5000);
        let points = marks
            .iter()
            .filter(|m| matches!(m, Mark::Point { .. }))
            .count();
        assert_eq!(
            points, 4,
            "seq 2..5; seq 1 is before and seq 6 after the window"
        );
        assert!(marks.iter().any(|m| matches!(
            m,
            Mark::Point {
                violation: true,
                ..
            }
        )));
        assert!(marks.iter().any(|m| matches!(
            m,
            Mark::Window {
                start_ns: 2500,
                end_ns: 2900,
                ..
            }
        )));
    }

    #[test]
    fn report_page_is_self_contained_with_a_section_per_result() {
        let page = render(&crate::run::report::tests::report());
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(
            !page.contains("<script") && !page.contains("http"),
            "no external resources"
        );
        assert_eq!(page.matches("<section").count(), 3);
        assert!(page.contains("class=\"mismatch\""));
        assert!(page.contains("Expected to fail: B1"));
    }

    /// Renders a report with a violation in headless Chromium (Debian's, from
    /// ci/install-deps.sh) and checks the screenshot shows the red violation mark; the PNG is
    /// kept with its page in target/p2prig/runs/render-check/.
    #[test]
    #[ignore = "needs Debian's chromium; run by `make report-render-test`"]
    fn html_report_renders_in_chromium() -> anyhow::Result<()> {
        // A run directory like a real run's, kept with its screenshot for inspection.
        let dir = crate::rig::paths::output_root().join("runs/render-check");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("agent.transcript"), TRANSCRIPT)?;
        std::fs::write(dir.join("roce-target.transcript"), TARGET_TRANSCRIPT)?;
        std::fs::write(dir.join("nvme-cmb.trace.jsonl"), TRACE)?;
        let mut report = crate::run::report::tests::report();
        for r in &mut report.results {
            r.run_dir = dir.clone();
            r.start_ns = 0;
            r.end_ns = 10_000;
        }
        let page = dir.join("report.html");
        write(&report, &page)?;
        let png = dir.join("report.png");
        let profile = tempfile::tempdir()?;
        // CHROME=: the runner's own browser where Debian's chromium is not installed (Ubuntu's
        // is a snap; GitHub's image has google-chrome).
        let browser = std::env::var("CHROME")
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "chromium".into());
        let status = std::process::Command::new(&browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1000,1800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--screenshot={}", png.display()))
            .arg(format!("file://{}", page.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .with_context(|| {
                format!("running {browser} (install chromium with `make deps`, or set CHROME=/path/to/chrome)")
            })?;
        assert!(status.success(), "{browser} failed: {status}");
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png)?));
        let mut reader = decoder.read_info()?;
        let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
        let info = reader.next_frame(&mut buf)?;
        let channels = info.color_type.samples();
        let count = |rgb: [u8; 3]| {
            buf[..info.buffer_size()]
                .chunks(channels)
                .filter(|px| px.len() >= 3 && px[..3] == rgb)
                .count()
        };
        let violation_red = count([0xd0, 0x10, 0x10]);
        assert!(
            violation_red > 20,
            "the red violation mark is visible ({violation_red} pixels)"
        );
        // The target lane's NAKed poll and the guest's failed request are drawn as not-ok
        // spans.
        let not_ok = count([0xd9, 0x8c, 0x1f]);
        assert!(not_ok > 20, "not-ok spans are visible ({not_ok} pixels)");
        Ok(())
    }

    #[test]
    fn svg_has_lanes_titles_and_a_red_violation() {
        let mut marks = rpc_marks(TRANSCRIPT, Lane::Guest, 0, 10_000);
        marks.extend(rpc_marks(TARGET_TRANSCRIPT, Lane::Target, 0, 10_000));
        marks.extend(device_marks(TRACE, 0, 10_000));
        let svg = timeline_svg(&marks, 0, 10_000);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for lane in ["guest", "target", "device"] {
            assert!(svg.contains(&format!(">{lane}</text>")));
        }
        assert!(svg.contains("class=\"violation\"") && svg.contains("#d01010"));
        assert!(svg.contains("<title>reset (flr)</title>"));
        assert!(svg.contains("NAK 0x62 wr 2 write"));
        assert_eq!(svg.matches("<title>").count(), 2 + 3 + 6 + 1);
    }
}
