//! Line charts written as PNG and SVG with an embedded font (DejaVu Sans), so they read the same
//! on a machine with no system fonts.
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One line, with an optional shaded band (e.g. ± one std over seeds).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
    pub color: RGBColor,
    pub highlight: bool,
}

impl Series {
    /// A plain line: no band, normal width.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Self {
        Self { name: name.into(), points, band: vec![], color, highlight: false }
    }
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Plot x on a log10 axis.
    pub log_x: bool,
    /// Legend in the upper right (for falling or flat curves) instead of the lower right.
    pub legend_upper: bool,
    pub series: Vec<Series>,
}

/// The series without their first point (and band point): a training curve's first evaluation
/// sits far below the rest and would take most of the height.
pub fn after_first(series: Vec<Series>) -> Vec<Series> {
    series
        .into_iter()
        .map(|s| Series {
            points: s.points.into_iter().skip(1).collect(),
            band: s.band.into_iter().skip(1).collect(),
            ..s
        })
        .collect()
}

/// A palette that stays distinguishable for up to ~10 lines; the baseline is drawn in black.
pub fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 10] = [
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
    P[i % P.len()]
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |err: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("plot: {err:?}");
    root.fill(&WHITE).map_err(e)?;
    let tx = |x: f64| if chart.log_x { x.max(1e-12).log10() } else { x };
    let all: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .map(|&(x, y)| (tx(x), y))
                .chain(s.band.iter().flat_map(|&(x, lo, hi)| [(tx(x), lo), (tx(x), hi)]))
        })
        .collect();
    if all.is_empty() {
        root.draw(&Text::new(format!("{}: no data yet", chart.title), (20, 20), ("sans-serif", 22).into_font()))
            .map_err(e)?;
        return root.present().map_err(e);
    }
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 - x0 < 1e-9 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    if y1 - y0 < 1e-9 {
        y0 -= 0.05;
        y1 += 0.05;
    }
    let (px, py) = ((x1 - x0) * 0.03, (y1 - y0) * 0.05);
    let mut c = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 24))
        .margin(14)
        .x_label_area_size(50)
        .y_label_area_size(72)
        .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
        .map_err(e)?;
    let log_x = chart.log_x;
    c.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_label_formatter(&|v| if log_x { format_si(10f64.powf(*v)) } else { format_si(*v) })
        .y_label_formatter(&|v| format!("{v:.2}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(e)?;
    for s in &chart.series {
        if !s.band.is_empty() {
            let mut poly: Vec<(f64, f64)> = s.band.iter().map(|&(x, _, hi)| (tx(x), hi)).collect();
            poly.extend(s.band.iter().rev().map(|&(x, lo, _)| (tx(x), lo)));
            c.draw_series(std::iter::once(Polygon::new(poly, s.color.mix(0.18).filled()))).map_err(e)?;
        }
        let style =
            ShapeStyle { color: s.color.to_rgba(), filled: true, stroke_width: if s.highlight { 4 } else { 2 } };
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (tx(x), y)).collect();
        let color = s.color;
        c.draw_series(LineSeries::new(pts.clone(), style)).map_err(e)?.label(s.name.clone()).legend(move |(x, y)| {
            PathElement::new(
                vec![(x, y), (x + 20, y)],
                ShapeStyle { color: color.to_rgba(), filled: true, stroke_width: 3 },
            )
        });
        if pts.len() <= 12 {
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, s.color.filled()))).map_err(e)?;
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(if chart.legend_upper { SeriesLabelPosition::UpperRight } else { SeriesLabelPosition::LowerRight })
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

/// 1 234 567 → "1.2M"; small values keep their decimals.
pub fn format_si(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes `<stem>.png` and `<stem>.svg` into `dir`.
pub fn write(dir: &Path, stem: &str, chart: &Chart) -> anyhow::Result<()> {
    register_font();
    let png = dir.join(format!("{stem}.png"));
    draw(BitMapBackend::new(&png, (960, 600)).into_drawing_area(), chart)?;
    let svg = dir.join(format!("{stem}.svg"));
    draw(SVGBackend::new(&svg, (960, 600)).into_drawing_area(), chart)?;
    Ok(())
}
