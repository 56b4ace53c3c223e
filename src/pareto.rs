//! `amalgam pareto`: size against quality for groups of evaluated models — a
//! Markdown table with the Pareto front marked, and a PNG plot.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

/// Tabulate and plot parameters against mean held-out loss for series of
/// models evaluated by `amalgam eval --json` (optionally with --reference).
#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    amalgam eval work/sub/* --reference work/zoo/small/matformer --json > sub.json\n  \
    amalgam pareto --series \"Mix'n'Match=sub.json\" --series \"Baselines=base.json\" \\\n      \
    --png docs/pareto.png")]
pub struct Args {
    /// LABEL=FILE: a series of models (the JSON `amalgam eval --json` prints).
    #[arg(long = "series", required = true, value_name = "LABEL=FILE")]
    series: Vec<String>,
    /// Write the plot here.
    #[arg(long)]
    png: Option<PathBuf>,
    /// The size axis: parameters, or FLOPs per token (stitched families).
    #[arg(long, value_enum, default_value = "parameters")]
    x: Size,
    /// The plot's title.
    #[arg(long, default_value = "Parameters vs. held-out loss")]
    title: String,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Size {
    Parameters,
    Flops,
}

#[derive(Deserialize)]
struct Evaluated {
    model: String,
    parameters: u64,
    flops_per_token: Option<u64>,
    /// A sub-series within the file (a stitched family's anchors or routes).
    group: Option<String>,
    domains: Vec<Score>,
}

#[derive(Deserialize)]
struct Score {
    domain: String,
    loss: f64,
    agreement: Option<f64>,
    kl: Option<f64>,
}

/// One model in the table and the plot.
struct Point {
    series: usize,
    name: String,
    parameters: u64,
    flops_per_token: Option<u64>,
    /// Parameters or FLOPs per token, as `--x` says.
    size: u64,
    losses: Vec<(String, f64)>,
    loss: f64,
    agreement: Option<f64>,
    kl: Option<f64>,
    on_front: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut labels: Vec<String> = vec![];
    let mut points = vec![];
    for spec in &args.series {
        let (label, file) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--series {spec:?}: expected LABEL=FILE"))?;
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading series {file}"))?;
        let models: Vec<Evaluated> = serde_json::from_str(&text)
            .with_context(|| format!("{file}: not the JSON `amalgam eval --json` prints"))?;
        for m in models {
            if m.domains.is_empty() {
                return Err(anyhow!("{file}: {} has no scores", m.model));
            }
            let n = m.domains.len() as f64;
            let mean = |f: &dyn Fn(&Score) -> Option<f64>| -> Option<f64> {
                m.domains.iter().map(f).sum::<Option<f64>>().map(|s| s / n)
            };
            let label = match &m.group {
                Some(group) => format!("{label}: {group}"),
                None => label.to_owned(),
            };
            let series = labels.iter().position(|l| *l == label).unwrap_or_else(|| {
                labels.push(label);
                labels.len() - 1
            });
            let size = match args.x {
                Size::Parameters => m.parameters,
                Size::Flops => m.flops_per_token.ok_or_else(|| {
                    anyhow!(
                        "{file}: {} has no flops_per_token (--x flops is for stitched families)",
                        m.model
                    )
                })?,
            };
            points.push(Point {
                series,
                name: Path::new(&m.model)
                    .file_name()
                    .map_or(m.model.clone(), |n| n.to_string_lossy().into_owned()),
                parameters: m.parameters,
                flops_per_token: m.flops_per_token,
                size,
                loss: mean(&|s| Some(s.loss)).unwrap_or_default(),
                agreement: mean(&|s| s.agreement),
                kl: mean(&|s| s.kl),
                losses: m
                    .domains
                    .iter()
                    .map(|s| (s.domain.clone(), s.loss))
                    .collect(),
                on_front: false,
            });
        }
    }
    mark_front(&mut points);
    print_table(&labels, &points);
    if let Some(png) = &args.png {
        plot(png, args.x, &args.title, &labels, &points)
            .map_err(|e| anyhow!("{}: cannot draw the plot: {e}", png.display()))?;
    }
    Ok(())
}

/// A point is on the front when no other point is at most as large (by the
/// chosen size) and strictly better.
fn mark_front(points: &mut [Point]) {
    let dominated: Vec<bool> = points
        .iter()
        .map(|p| {
            points.iter().any(|q| {
                q.size <= p.size && q.loss <= p.loss && (q.size < p.size || q.loss < p.loss)
            })
        })
        .collect();
    for (p, d) in points.iter_mut().zip(dominated) {
        p.on_front = !d;
    }
}

fn print_table(labels: &[String], points: &[Point]) {
    let domains: Vec<&str> = points[0].losses.iter().map(|(d, _)| d.as_str()).collect();
    let compared = points.iter().any(|p| p.agreement.is_some());
    let flops = points.iter().any(|p| p.flops_per_token.is_some());
    let mut header = String::from("| series | model | parameters |");
    if flops {
        header += " FLOPs/token |";
    }
    for d in &domains {
        header += &format!(" {d} |");
    }
    header += " mean loss |";
    if compared {
        header += " agreement | KL |";
    }
    println!("{header} front |");
    println!(
        "|---|---|---:|{}{}---:|{}:-:|",
        if flops { "---:|" } else { "" },
        "---:|".repeat(domains.len()),
        if compared { "---:|---:|" } else { "" }
    );
    let mut order: Vec<&Point> = points.iter().collect();
    order.sort_by_key(|p| (p.series, p.size));
    for p in order {
        let mut row = format!("| {} | {} | {} |", labels[p.series], p.name, p.parameters);
        if flops {
            row += &format!(
                " {} |",
                p.flops_per_token.map_or("–".into(), |f| f.to_string())
            );
        }
        for (_, loss) in &p.losses {
            row += &format!(" {loss:.4} |");
        }
        row += &format!(" {:.4} |", p.loss);
        if compared {
            let cell = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.4}"));
            row += &format!(" {} | {} |", cell(p.agreement), cell(p.kl));
        }
        println!("{row} {} |", if p.on_front { "●" } else { "" });
    }
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn plot(
    png: &Path,
    x: Size,
    title: &str,
    labels: &[String],
    points: &[Point],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "the embedded font does not load")?;
    let root = BitMapBackend::new(png, (960, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x_min, x_max) = bounds(points.iter().map(|p| p.size as f64));
    let (y_min, y_max) = bounds(points.iter().map(|p| p.loss));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc(match x {
            Size::Parameters => "parameters",
            Size::Flops => "FLOPs per token",
        })
        .y_desc("mean held-out loss (nats/token)")
        .x_label_formatter(&|x| format!("{:.0}k", x / 1e3))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    let mut front: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.on_front)
        .map(|p| (p.size as f64, p.loss))
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(front, BLACK.mix(0.35).stroke_width(2)))?
        .label("Pareto front")
        .legend(|(x, y)| {
            PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.35).stroke_width(2))
        });
    for (series, label) in labels.iter().enumerate() {
        let color = COLORS[series % COLORS.len()];
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.series == series)
                    .map(|p| Circle::new((p.size as f64, p.loss), 5, color.filled())),
            )?
            .label(label.as_str())
            .legend(move |(x, y)| Circle::new((x + 9, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The range of `values` with a 5% margin on each side.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let margin = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-9);
    (lo - margin, hi + margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(parameters: u64, loss: f64) -> Point {
        Point {
            series: 0,
            name: String::new(),
            parameters,
            flops_per_token: None,
            size: parameters,
            losses: vec![],
            loss,
            agreement: None,
            kl: None,
            on_front: false,
        }
    }

    #[test]
    fn the_front_holds_the_undominated_points() {
        let mut points = vec![
            point(10, 3.0),
            point(20, 2.0),
            point(20, 2.5), // same size, worse
            point(30, 2.2), // larger and worse than (20, 2.0)
            point(40, 1.0),
            point(10, 3.0), // a tie with the first: neither dominates
        ];
        mark_front(&mut points);
        let front: Vec<bool> = points.iter().map(|p| p.on_front).collect();
        assert_eq!(front, [true, true, false, false, true, true]);
    }
}
