//! Line and point charts written as PNG and SVG with an embedded font (DejaVu Sans), so they
//! read the same on a machine with no system fonts. The legend has its own panel to the right of
//! the plot, so it never covers data; axes are framed on the data's range; non-finite points are
//! never drawn (they are left out, and a chart with none left says "no data").
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

/// How a series marks its points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Marker {
    Circle,
    /// The paper's numbers: a hollow triangle.
    Triangle,
    None,
}

/// One series: a line through its points (or markers only), an optional shaded band (± one std
/// over seeds along a curve) or error bars (± one std at each point), and optional text labels
/// beside the points (e.g. the number of experts).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// `(x, low, high)` along the line.
    pub band: Vec<(f64, f64, f64)>,
    /// `(x, low, high)` at points.
    pub errors: Vec<(f64, f64, f64)>,
    /// One per point, or none.
    pub labels: Vec<String>,
    pub color: RGBColor,
    pub highlight: bool,
    pub line: bool,
    pub dashed: bool,
    pub marker: Marker,
}

impl Series {
    /// A plain line: no band, normal width, markers when it has few points.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Self {
        Self {
            name: name.into(),
            points,
            band: vec![],
            errors: vec![],
            labels: vec![],
            color,
            highlight: false,
            line: true,
            dashed: false,
            marker: Marker::Circle,
        }
    }
    /// Markers only.
    pub fn points(name: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor, marker: Marker) -> Self {
        Self { line: false, marker, ..Self::line(name, points, color) }
    }
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Plot x on a log₂ axis, ticks at powers of two.
    pub log_x: bool,
    /// Printed at the top of the legend panel (e.g. which setting the lines belong to).
    pub legend_title: Option<String>,
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
            labels: s.labels.into_iter().skip(1).collect(),
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

/// The series with every non-finite coordinate left out (a diverged run logs NaN or ±inf;
/// plotters' axis code never returns on them).
fn finite_only(series: &[Series], log_x: bool) -> Vec<Series> {
    let ok_x = |x: f64| x.is_finite() && (!log_x || x > 0.0);
    series
        .iter()
        .map(|s| {
            let keep: Vec<bool> = s.points.iter().map(|&(x, y)| ok_x(x) && y.is_finite()).collect();
            Series {
                name: s.name.clone(),
                points: s.points.iter().zip(&keep).filter(|(_, k)| **k).map(|(p, _)| *p).collect(),
                labels: s.labels.iter().zip(&keep).filter(|(_, k)| **k).map(|(l, _)| l.clone()).collect(),
                band: s
                    .band
                    .iter()
                    .copied()
                    .filter(|&(x, lo, hi)| ok_x(x) && lo.is_finite() && hi.is_finite())
                    .collect(),
                errors: s
                    .errors
                    .iter()
                    .copied()
                    .filter(|&(x, lo, hi)| ok_x(x) && lo.is_finite() && hi.is_finite())
                    .collect(),
                ..*s
            }
        })
        .collect()
}

/// The data's range in plot coordinates (x already on the log axis when `log_x`), padded.
fn frame(series: &[Series], tx: &dyn Fn(f64) -> f64) -> Option<((f64, f64), (f64, f64))> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .map(|&(x, y)| (tx(x), y))
                .chain(s.band.iter().chain(&s.errors).flat_map(|&(x, lo, hi)| [(tx(x), lo), (tx(x), hi)]))
        })
        .collect();
    if all.is_empty() {
        return None;
    }
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 - x0 < 1e-9 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.05, y1 + 0.05);
    }
    let (px, py) = ((x1 - x0) * 0.06, (y1 - y0) * 0.06);
    Some(((x0 - px, x1 + px), (y0 - py, y1 + py)))
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |err: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("plot: {err:?}");
    root.fill(&WHITE).map_err(e)?;
    let log_x = chart.log_x;
    let tx = move |x: f64| if log_x { x.log2() } else { x };
    let series = finite_only(&chart.series, log_x);
    let Some(((x0, x1), (y0, y1))) = frame(&series, &tx) else {
        root.draw(&Text::new(format!("{}: no data yet", chart.title), (20, 20), ("sans-serif", 22).into_font()))
            .map_err(e)?;
        return root.present().map_err(e);
    };
    let (width, _) = root.dim_in_pixel();
    let (plot_area, legend_area) = root.split_horizontally(width.saturating_sub(LEGEND_WIDTH));
    let mut c = ChartBuilder::on(&plot_area)
        .caption(chart.title, ("sans-serif", 19))
        .margin(14)
        .x_label_area_size(50)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    c.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_labels(if log_x { ((x1 - x0).ceil() as usize + 2).min(24) } else { 10 })
        .x_label_formatter(&|v| match log_x {
            // Only whole powers of two are labelled: 1, 2, 4, … experts; 512k, 1.0M, … parameters.
            true if (v - v.round()).abs() < 1e-6 => format_si(2f64.powf(v.round())),
            true => String::new(),
            false => format_si(*v),
        })
        .y_label_formatter(&|v| format!("{v:.2}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(e)?;
    for s in &series {
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (tx(x), y)).collect();
        if !s.band.is_empty() {
            let mut poly: Vec<(f64, f64)> = s.band.iter().map(|&(x, _, hi)| (tx(x), hi)).collect();
            poly.extend(s.band.iter().rev().map(|&(x, lo, _)| (tx(x), lo)));
            c.draw_series(std::iter::once(Polygon::new(poly, s.color.mix(0.18).filled()))).map_err(e)?;
        }
        for &(x, lo, hi) in &s.errors {
            c.draw_series(std::iter::once(ErrorBar::new_vertical(tx(x), lo, (lo + hi) / 2.0, hi, s.color.filled(), 8)))
                .map_err(e)?;
        }
        let style =
            ShapeStyle { color: s.color.to_rgba(), filled: true, stroke_width: if s.highlight { 4 } else { 2 } };
        if s.line && s.dashed {
            c.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style)).map_err(e)?;
        } else if s.line {
            c.draw_series(LineSeries::new(pts.clone(), style)).map_err(e)?;
        }
        if s.marker != Marker::None && (pts.len() <= 16 || !s.line) {
            let color = s.color;
            match s.marker {
                Marker::Triangle => {
                    c.draw_series(pts.iter().map(|&p| TriangleMarker::new(p, 7, color.stroke_width(2))))
                }
                _ => c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))),
            }
            .map_err(e)?;
        }
        for (p, label) in pts.iter().zip(&s.labels) {
            let text = Text::new(label.clone(), *p, ("sans-serif", 13).into_font().color(&s.color));
            c.plotting_area().draw(&EmptyElement::at(*p)).map_err(e)?;
            c.draw_series(std::iter::once(text)).map_err(e)?;
        }
    }
    draw_legend(&legend_area, chart.legend_title.as_deref(), &series).map_err(e)?;
    root.present().map_err(e)
}

/// Width of the legend panel, pixels.
const LEGEND_WIDTH: u32 = 300;

/// One entry per series, in its own panel: a sample of the line or marker and the name,
/// wrapped to the panel's width.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: Option<&str>,
    series: &[Series],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut y = 60;
    for line in title.map(|t| wrap(t, 34)).unwrap_or_default() {
        area.draw(&Text::new(line, (6, y), ("sans-serif", 15).into_font()))?;
        y += 18;
    }
    if title.is_some() {
        y += 8;
    }
    for s in series {
        let style =
            ShapeStyle { color: s.color.to_rgba(), filled: true, stroke_width: if s.highlight { 4 } else { 3 } };
        if s.line && s.dashed {
            area.draw(&PathElement::new(vec![(6, y + 8), (16, y + 8)], style))?;
            area.draw(&PathElement::new(vec![(22, y + 8), (34, y + 8)], style))?;
        } else if s.line {
            area.draw(&PathElement::new(vec![(6, y + 8), (34, y + 8)], style))?;
        }
        match s.marker {
            Marker::Triangle => area.draw(&TriangleMarker::new((20, y + 8), 7, s.color.stroke_width(2)))?,
            Marker::Circle if !s.line => area.draw(&Circle::new((20, y + 8), 4, s.color.filled()))?,
            _ => {}
        }
        for line in wrap(&s.name, 34) {
            area.draw(&Text::new(line, (42, y), ("sans-serif", 14).into_font()))?;
            y += 18;
        }
        y += 8;
    }
    Ok(())
}

/// `text` in lines of at most about `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = vec![String::new()];
    for word in text.split(' ') {
        let last = lines.last_mut().expect("one line");
        if !last.is_empty() && last.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
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
    draw(BitMapBackend::new(&png, (1100, 600)).into_drawing_area(), chart)?;
    let svg = dir.join(format!("{stem}.svg"));
    draw(SVGBackend::new(&svg, (1100, 600)).into_drawing_area(), chart)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_points_are_left_out_and_a_chart_of_only_those_says_no_data() {
        let s = Series::line("a", vec![(1.0, f64::NAN), (2.0, 1.0), (f64::INFINITY, 2.0)], color(0));
        let kept = finite_only(&[s], false);
        assert_eq!(kept[0].points, vec![(2.0, 1.0)]);
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path();
        let nan = Chart {
            title: "t",
            x_label: "x",
            y_label: "y",
            log_x: true,
            legend_title: None,
            series: vec![Series::line("nan", vec![(0.0, 1.0), (1.0, f64::NAN)], color(0))],
        };
        write(tmp, "nan", &nan).unwrap();
        assert!(std::fs::read_to_string(tmp.join("nan.svg")).unwrap().contains("no data yet"));
    }

    #[test]
    fn legend_names_wrap_at_spaces() {
        assert_eq!(
            wrap("Switch-8 router_init_scale=10.0 capacity_factor=1.0", 20),
            vec!["Switch-8", "router_init_scale=10.0", "capacity_factor=1.0"]
        );
    }
}
