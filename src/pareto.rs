//! `amalgam pareto`: size against quality for groups of evaluated models — a
//! Markdown table with the Pareto front marked, and a PNG plot.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use amalgam_checkpoint::{read_regular, OutputFile, MAX_JSON_BYTES};
use amalgam_nn::scores::{parse_scores, DomainLoss};
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;

/// Tabulate and plot size against held-out loss, the Pareto front marked.
///
/// Parameters (or FLOPs per token) against mean held-out loss for series of
/// models evaluated by `amalgam eval --json` (optionally with --reference):
/// a Markdown table, and a PNG plot.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    amalgam eval work/sub/* --reference work/zoo/small/matformer --json > sub.json\n  \
    amalgam pareto --series \"Mix'n'Match=sub.json\" --series \"Baselines=base.json\" \\\n      \
    --png docs/pareto.png")]
pub struct Args {
    /// LABEL=FILE: a series of models (the JSON `amalgam eval --json` prints).
    #[arg(long = "series", required = true, value_name = "LABEL=FILE")]
    series: Vec<String>,
    /// Write the plot here, a PNG (must not exist, unless --force).
    #[arg(long)]
    png: Option<PathBuf>,
    /// Replace an existing --png file (a symlink there is replaced as a link,
    /// never written through).
    #[arg(long)]
    force: bool,
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

/// The most bytes of a series file read (`eval --json` of a thousand models
/// is about a megabyte).
const MAX_SERIES_BYTES: u64 = MAX_JSON_BYTES;

/// The plot's size in pixels.
const PLOT_SIZE: (u32, u32) = (960, 640);

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
    let mut inputs = vec![];
    // The first model read, its file and domains: every other is scored on the same.
    let mut first: Option<(String, String, Vec<String>)> = None;
    for spec in &args.series {
        let (label, file) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--series {spec:?}: expected LABEL=FILE"))?;
        let bytes = read_regular(Path::new(file), MAX_SERIES_BYTES, "a series")
            .map_err(|e| anyhow!("reading series: {e}"))?;
        let models = parse_scores(&bytes).map_err(|e| anyhow!("{file}: {e}"))?;
        inputs.push(PathBuf::from(file));
        for m in models {
            let domains: Vec<String> = m.domains.iter().map(|s| s.domain.clone()).collect();
            match &first {
                None => first = Some((file.to_owned(), m.model.clone(), domains)),
                Some((first_file, first_model, first_domains)) if *first_domains != domains => {
                    bail!(
                        "{file}: {} is scored on {domains:?}, but {first_model} (in {first_file}) \
                         on {first_domains:?}: the table compares models on the same domains, in \
                         the same order",
                        m.model
                    );
                }
                Some(_) => {}
            }
            let n = m.domains.len() as f64;
            let mean = |f: &dyn Fn(&DomainLoss) -> Option<f64>| -> Option<f64> {
                m.domains.iter().map(f).sum::<Option<f64>>().map(|s| s / n)
            };
            let loss = mean(&|s| Some(s.loss)).unwrap_or_default();
            if !loss.is_finite() {
                bail!(
                    "{file}: {}: the mean of its losses is not a finite number",
                    m.model
                );
            }
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
                loss,
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
    // Checked before anything is printed or drawn.
    let png = match &args.png {
        Some(path) => Some((path, OutputFile::create(path, args.force, &inputs)?)),
        None => None,
    };
    mark_front(&mut points);
    print_table(&labels, &points)?;
    if let Some((path, mut file)) = png {
        let bytes = plot(args.x, &args.title, &labels, &points)
            .map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))?;
        file.write_all(&bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        file.commit()?;
    }
    Ok(())
}

/// A point is on the front when no other point is at most as large (by the
/// chosen size) and strictly better. One sort and one sweep: a point is
/// dominated by a smaller one with a loss at most its own, or by one of the
/// same size with a lower loss.
fn mark_front(points: &mut [Point]) {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        (points[a].size.cmp(&points[b].size)).then(points[a].loss.total_cmp(&points[b].loss))
    });
    // The lowest loss among the points smaller than the current size.
    let mut best_smaller = f64::INFINITY;
    let mut start = 0;
    while start < order.len() {
        let size = points[order[start]].size;
        let end = start
            + order[start..]
                .iter()
                .take_while(|&&i| points[i].size == size)
                .count();
        let group_best = points[order[start]].loss;
        for &i in &order[start..end] {
            let loss = points[i].loss;
            points[i].on_front = !(best_smaller <= loss || group_best < loss);
        }
        best_smaller = best_smaller.min(group_best);
        start = end;
    }
}

/// Text as one Markdown table cell: no column breaks, no line breaks.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn print_table(labels: &[String], points: &[Point]) -> Result<()> {
    let Some(first) = points.first() else {
        bail!("no models to tabulate");
    };
    let domains: Vec<&str> = first.losses.iter().map(|(d, _)| d.as_str()).collect();
    let compared = points.iter().any(|p| p.agreement.is_some());
    let flops = points.iter().any(|p| p.flops_per_token.is_some());
    let mut header = String::from("| series | model | parameters |");
    if flops {
        header += " FLOPs/token |";
    }
    for d in &domains {
        header += &format!(" {} |", cell(d));
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
        let mut row = format!(
            "| {} | {} | {} |",
            cell(&labels[p.series]),
            cell(&p.name),
            p.parameters
        );
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
    Ok(())
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

/// The plot, encoded as a PNG.
fn plot(
    x: Size,
    title: &str,
    labels: &[String],
    points: &[Point],
) -> std::result::Result<Vec<u8>, Box<dyn std::error::Error>> {
    let (width, height) = PLOT_SIZE;
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    draw(&mut pixels, x, title, labels, points)?;
    let mut png = vec![];
    let mut encoder = png::Encoder::new(&mut png, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(png)
}

/// Draws the plot into `pixels` (RGB, [`PLOT_SIZE`]).
fn draw(
    pixels: &mut [u8],
    x: Size,
    title: &str,
    labels: &[String],
    points: &[Point],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "the embedded font does not load")?;
    let (x_min, x_max) = bounds(points.iter().map(|p| p.size as f64))?;
    let (y_min, y_max) = bounds(points.iter().map(|p| p.loss))?;
    let root = BitMapBackend::with_buffer(pixels, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
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

/// The largest magnitude an axis reaches: the plotting library's tick
/// search does not end on ranges near the largest `f64`.
const PLOT_LIMIT: f64 = 1e300;

/// The range of `values` with a 5% margin on each side; an error where it
/// goes beyond ±[`PLOT_LIMIT`].
fn bounds(values: impl Iterator<Item = f64>) -> std::result::Result<(f64, f64), String> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let margin = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-9);
    let (lo, hi) = (lo - margin, hi + margin);
    if !(lo.abs() <= PLOT_LIMIT && hi.abs() <= PLOT_LIMIT) {
        return Err(format!(
            "values from {lo:e} to {hi:e} are too large to plot (the axes reach ±{PLOT_LIMIT:e})"
        ));
    }
    Ok((lo, hi))
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

    /// The definition, pair by pair (quadratic: the sweep must agree with it).
    fn front_by_definition(points: &[Point]) -> Vec<bool> {
        points
            .iter()
            .map(|p| {
                !points.iter().any(|q| {
                    q.size <= p.size && q.loss <= p.loss && (q.size < p.size || q.loss < p.loss)
                })
            })
            .collect()
    }

    #[test]
    fn the_sweep_agrees_with_the_definition() {
        let mut state = 7u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        for _ in 0..200 {
            let len = 1 + next(30) as usize;
            let mut points: Vec<Point> = (0..len)
                .map(|_| point(next(8), next(6) as f64 / 2.0))
                .collect();
            let expected = front_by_definition(&points);
            mark_front(&mut points);
            let front: Vec<bool> = points.iter().map(|p| p.on_front).collect();
            assert_eq!(front, expected);
        }
    }

    #[test]
    fn many_points_are_marked_quickly() {
        // A large series file: the pairwise check would take hours.
        let mut points: Vec<Point> = (0..200_000u64)
            .map(|i| point(i % 1000, (i % 977) as f64))
            .collect();
        let started = std::time::Instant::now();
        mark_front(&mut points);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(points.iter().any(|p| p.on_front));
    }

    #[test]
    fn bounds_too_large_to_plot_are_an_error() {
        assert!(bounds([1.0, 2.0].into_iter()).is_ok());
        assert!(bounds([f64::MAX, 0.0].into_iter()).is_err());
        assert!(bounds([1.7e308, 1.0].into_iter()).is_err());
        assert!(bounds([-f64::MAX, f64::MAX].into_iter()).is_err());
    }

    #[test]
    fn cells_hold_no_column_or_line_breaks() {
        assert_eq!(cell("a|b\nc"), "a\\|b c");
    }
}
