//! The benchmark's chart: grouped horizontal bars, written as SVG by hand
//! (a few dozen elements do not need a plotting library).

use std::fmt::Write as _;

use crate::{dataplane_bench::SCALE_ROWS, results::Results, throughput::Mode};

/// Colours of the series, in order (colour-blind safe, Okabe–Ito).
const COLOURS: [&str; 5] = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9"];
const WIDTH: f64 = 860.0;
const LABEL_W: f64 = 300.0;
const BAR_H: f64 = 13.0;
const GROUP_GAP: f64 = 8.0;
const TITLE_H: f64 = 44.0;
const PANEL_GAP: f64 = 22.0;

/// One panel: groups of bars, one bar per series present in the group.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub series: Vec<String>,
    pub groups: Vec<Group>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub label: String,
    /// (series index, value).
    pub bars: Vec<(usize, f64)>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Panel {
    fn height(&self) -> f64 {
        let bars: usize = self.groups.iter().map(|g| g.bars.len().max(1)).sum();
        TITLE_H + bars as f64 * BAR_H + self.groups.len() as f64 * GROUP_GAP
    }

    /// The panel's elements, its top at `y`.
    fn draw(&self, out: &mut String, y: f64) {
        let max = self
            .groups
            .iter()
            .flat_map(|g| g.bars.iter().map(|b| b.1))
            .fold(0.0f64, f64::max);
        let scale = if max > 0.0 {
            (WIDTH - LABEL_W - 90.0) / max
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.1}" font-weight="bold">{} ({})</text>"#,
            y + 16.0,
            escape(&self.title),
            escape(&self.unit)
        );
        let mut x = 10.0;
        for (i, name) in self.series.iter().enumerate() {
            if self.series.len() < 2 {
                break;
            }
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                y + 24.0,
                COLOURS[i % COLOURS.len()],
                x + 14.0,
                y + 33.0,
                escape(name)
            );
            x += 28.0 + 6.2 * name.chars().count() as f64;
        }
        let mut cy = y + TITLE_H;
        for group in &self.groups {
            let rows = group.bars.len().max(1) as f64;
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"#,
                LABEL_W - 8.0,
                cy + rows * BAR_H / 2.0 + 4.0,
                escape(&group.label)
            );
            for &(series, value) in &group.bars {
                let w = (value * scale).max(0.5);
                let _ = writeln!(
                    out,
                    r#"<rect x="{LABEL_W:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{}: {value:.0}</title></rect><text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                    cy + 1.0,
                    BAR_H - 2.0,
                    COLOURS[series % COLOURS.len()],
                    escape(self.series.get(series).map_or("", String::as_str)),
                    LABEL_W + w + 4.0,
                    cy + BAR_H - 3.0,
                    thousands(value)
                );
                cy += BAR_H;
            }
            if group.bars.is_empty() {
                cy += BAR_H;
            }
            cy += GROUP_GAP;
        }
    }
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// Panels stacked in one SVG document, with a caption line at the bottom.
pub fn svg(panels: &[Panel], caption: &str) -> String {
    let height: f64 = panels.iter().map(|p| p.height() + PANEL_GAP).sum::<f64>() + 30.0;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH:.0}" height="{height:.0}" viewBox="0 0 {WIDTH:.0} {height:.0}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    let mut y = 10.0;
    for p in panels {
        p.draw(&mut out, y);
        y += p.height() + PANEL_GAP;
    }
    let _ = writeln!(
        out,
        r##"<text x="10" y="{:.1}" font-size="10" fill="#555">{}</text>"##,
        height - 10.0,
        escape(caption)
    );
    out.push_str("</svg>\n");
    out
}

/// The chart of a run: ns/packet by path (part 1), ns/packet by size (part
/// 2), and connections/s, request p99 and UDP packets/s by mode and service
/// count (part 3). Parts not run are left out.
pub fn draw(results: &Results) -> String {
    let mut panels = Vec::new();
    if let Some(d) = &results.dataplane {
        panels.push(Panel {
            title: "Sluice XDP data plane, BPF_PROG_TEST_RUN".into(),
            unit: "ns/packet, lower is better".into(),
            series: vec!["ns/packet".into()],
            groups: d
                .rows
                .iter()
                .map(|r| Group {
                    label: r.name.clone(),
                    bars: vec![(0, r.ns_per_packet)],
                })
                .collect(),
        });
    }
    if let Some(s) = &results.scaling {
        let cases: Vec<_> = s.cases.iter().filter(|c| c.skipped.is_none()).collect();
        panels.push(Panel {
            title: "Scaling: the same paths by size".into(),
            unit: "ns/packet, flat is the goal".into(),
            series: cases.iter().map(|c| c.label.clone()).collect(),
            groups: SCALE_ROWS
                .iter()
                .enumerate()
                .map(|(i, name)| Group {
                    label: (*name).to_owned(),
                    bars: cases
                        .iter()
                        .enumerate()
                        .filter_map(|(series, c)| c.rows.get(i).map(|r| (series, r.ns_per_packet)))
                        .collect(),
                })
                .collect(),
        });
    }
    if let Some(t) = &results.throughput {
        let mut sizes: Vec<usize> = t.rows.iter().map(|r| r.services).collect();
        sizes.dedup();
        let series: Vec<String> = Mode::ALL.iter().map(|m| m.name().to_owned()).collect();
        let panel =
            |title: &str, unit: &str, value: &dyn Fn(&crate::throughput::Measurement) -> f64| {
                Panel {
                    title: title.into(),
                    unit: unit.into(),
                    series: series.clone(),
                    groups: sizes
                        .iter()
                        .map(|&n| Group {
                            label: format!(
                                "{} service{}",
                                thousands(n as f64),
                                if n == 1 { "" } else { "s" }
                            ),
                            bars: t
                                .rows
                                .iter()
                                .filter(|r| r.services == n)
                                .filter_map(|r| {
                                    let s = Mode::ALL.iter().position(|m| *m == r.mode)?;
                                    Some((s, value(r)))
                                })
                                .collect(),
                        })
                        .collect(),
                }
            };
        panels.push(panel(
            "TCP connections/s through the node (connect, request, response, close)",
            "higher is better",
            &|r| r.conns_per_s,
        ));
        panels.push(panel(
            "Request/response latency p99, kept-alive connections",
            "µs, lower is better",
            &|r| f64::from(r.rr_p99_us),
        ));
        panels.push(panel(
            "UDP packets/s received by the backends",
            "higher is better",
            &|r| r.udp_received_pps,
        ));
    }
    let m = &results.machine;
    svg(
        &panels,
        &format!(
            "{} — {}, kernel {}, {} CPUs, {:.0} GiB — {}",
            results.command, m.cpu, m.kernel, m.cpus, m.memory_gib, m.date
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel() -> Panel {
        Panel {
            title: "t <1>".into(),
            unit: "ns".into(),
            series: vec!["a".into(), "b & c".into()],
            groups: vec![
                Group {
                    label: "g1".into(),
                    bars: vec![(0, 100.0), (1, 50.0)],
                },
                Group {
                    label: "g2".into(),
                    bars: vec![(1, 25.0)],
                },
            ],
        }
    }

    #[test]
    fn bars_are_proportional_and_text_is_escaped() {
        let out = svg(&[panel()], "cap");
        assert!(out.starts_with("<svg ") && out.ends_with("</svg>\n"));
        assert!(out.contains("t &lt;1&gt;") && out.contains("b &amp; c"));
        // Bars start at the label column; the legend's swatches are 10 wide.
        let widths: Vec<f64> = out
            .split(r#"<rect x="300.0""#)
            .skip(1)
            .filter_map(|s| s.split("width=\"").nth(1)?.split('"').next()?.parse().ok())
            .filter(|w: &f64| *w > 10.0)
            .collect();
        assert_eq!(widths.len(), 3, "{widths:?}");
        let full = WIDTH - LABEL_W - 90.0;
        assert!((widths[0] - full).abs() < 0.1);
        assert!((widths[1] - full / 2.0).abs() < 0.1);
        assert!((widths[2] - full / 4.0).abs() < 0.1);
        // Every element opened is closed.
        assert_eq!(
            out.matches("<rect").count(),
            out.matches("/>").count() + out.matches("</rect>").count()
        );
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(-12_345.0), "-12,345");
    }
}
