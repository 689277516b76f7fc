//! The report's figures, drawn with plotters into a PNG (bitmap backend, encoded by the
//! `image` crate) and an SVG (SVG backend) from the same drawing code.
//!
//! Text is rasterized by plotters' `ab_glyph` font backend from a font embedded in the binary
//! (Hack Regular, from `epaint_default_fonts`), registered once as `sans-serif`; the usual
//! `ttf` backend would need fontconfig and freetype on the machine. In the SVG the text stays
//! text (`font-family="sans-serif"`), laid out with the same font's metrics.
//!
//! Nothing here reads the clock or iterates a hash map, so the same inputs give the same
//! bytes; `report::tests` checks it.

use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::ReportError;
use crate::kinds::cl_metrics::LossCurve;

/// A figure in both formats.
pub struct Figure {
    /// PNG bytes.
    pub png: Vec<u8>,
    /// SVG text.
    pub svg: String,
}

const FONT: &str = "sans-serif";

/// Registers the embedded font with plotters (once per process).
fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::HACK_REGULAR)
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ReportError::Plot(
            "BUG: the embedded font did not parse".into(),
        ))
    }
}

fn plot_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Plot(e.to_string())
}

/// A figure's drawing code, generic over the backend so one routine makes both files.
trait Draw {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), ReportError>;
}

/// Draws `fig` at `size` on both backends.
fn render(size: (u32, u32), fig: &impl Draw) -> Result<Figure, ReportError> {
    ensure_font()?;
    let (w, h) = size;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        fig.draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    let img = image::RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| ReportError::Plot("BUG: bitmap buffer of the wrong size".into()))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(plot_err)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        fig.draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    Ok(Figure { png, svg })
}

/// Fill colour of an accuracy in percent: white to dark blue.
fn shade(v: f64) -> RGBColor {
    let t = (v / 100.0).clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(mix(247.0, 8.0), mix(251.0, 48.0), mix(255.0, 107.0))
}

/// Geometry of a heatmap, computed once from text sizes so both backends agree.
struct HeatLayout {
    cell: i32,
    left: i32,
    top: i32,
    size: (u32, u32),
}

const TITLE_PX: f64 = 18.0;
const LABEL_PX: f64 = 13.0;
const CELL_PX: f64 = 13.0;
const NOTE_PX: f64 = 11.0;
const NOTE: &str = "rows: after training task i; columns: accuracy (%) on task j";

fn text_width(text: &str, px: f64) -> Result<i32, ReportError> {
    ensure_font()?;
    // The layout estimate is backend-independent; a 1x1 SVG is the cheapest area to ask.
    let mut sink = String::new();
    let area = SVGBackend::with_string(&mut sink, (1, 1)).into_drawing_area();
    let (w, _) = area
        .estimate_text_size(text, &(FONT, px).into_text_style(&area))
        .map_err(plot_err)?;
    Ok(i32::try_from(w).unwrap_or(i32::MAX))
}

fn heat_layout(title: &str, tasks: &[String]) -> Result<HeatLayout, ReportError> {
    let mut widest = 0;
    for t in tasks {
        widest = widest.max(text_width(t, LABEL_PX)?);
    }
    let cell = (widest + 12).max(56);
    let left = widest + 24;
    let top = 64;
    let n = i32::try_from(tasks.len()).unwrap_or(i32::MAX);
    let w = (left + n * cell + 24)
        .max(text_width(title, TITLE_PX)? + 24)
        .max(text_width(NOTE, NOTE_PX)? + 24);
    let h = top + n * cell + 32;
    // A title wider than the grid: centre the grid under it.
    let left = left.max((w - n * cell) / 2);
    Ok(HeatLayout {
        cell,
        left,
        top,
        size: (w.unsigned_abs(), h.unsigned_abs()),
    })
}

/// The accuracy matrix as a heatmap: row `i` = after training task `i`, column `j` = task
/// `j`, the lower triangle filled and each value written in its cell.
///
/// # Errors
/// A drawing error (none expected for well-formed input).
pub fn heatmap(title: &str, tasks: &[String], matrix: &[Vec<f64>]) -> Result<Figure, ReportError> {
    let layout = heat_layout(title, tasks)?;
    render(
        layout.size,
        &Heat {
            layout: &layout,
            title,
            tasks,
            matrix,
        },
    )
}

struct Heat<'a> {
    layout: &'a HeatLayout,
    title: &'a str,
    tasks: &'a [String],
    matrix: &'a [Vec<f64>],
}

impl Draw for Heat<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), ReportError> {
        let (l, tasks) = (self.layout, self.tasks);
        root.fill(&WHITE).map_err(plot_err)?;
        let center = Pos::new(HPos::Center, VPos::Center);
        let title_style = (FONT, TITLE_PX).into_font().color(&BLACK).pos(center);
        let w = to_i32(l.size.0 as usize);
        root.draw_text(self.title, &title_style, (w / 2, 16))
            .map_err(plot_err)?;
        let note = (FONT, NOTE_PX)
            .into_font()
            .color(&RGBColor(90, 90, 90))
            .pos(center);
        root.draw_text(NOTE, &note, (w / 2, 38)).map_err(plot_err)?;
        let label_right = (FONT, LABEL_PX)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center));
        let label_top = (FONT, LABEL_PX)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        let n = tasks.len();
        let bottom = l.top + to_i32(n) * l.cell;
        for (k, task) in tasks.iter().enumerate() {
            let at = to_i32(k) * l.cell + l.cell / 2;
            root.draw_text(task, &label_right, (l.left - 8, l.top + at))
                .map_err(plot_err)?;
            root.draw_text(task, &label_top, (l.left + at, bottom + 8))
                .map_err(plot_err)?;
        }
        for i in 0..n {
            for j in 0..n {
                let x0 = l.left + to_i32(j) * l.cell;
                let y0 = l.top + to_i32(i) * l.cell;
                let corners = [(x0, y0), (x0 + l.cell, y0 + l.cell)];
                let value = self.matrix.get(i).and_then(|r| r.get(j)).copied();
                let fill = value.map_or(RGBColor(238, 238, 238), shade);
                root.draw(&Rectangle::new(corners, fill.filled()))
                    .map_err(plot_err)?;
                root.draw(&Rectangle::new(corners, WHITE.stroke_width(1)))
                    .map_err(plot_err)?;
                if let Some(v) = value {
                    // Dark cells get light text; the shade passes mid-blue around 55 %.
                    let ink = if v > 55.0 { WHITE } else { BLACK };
                    let style = (FONT, CELL_PX).into_font().color(&ink).pos(center);
                    let at = (x0 + l.cell / 2, y0 + l.cell / 2);
                    root.draw_text(&format!("{v:.1}"), &style, at)
                        .map_err(plot_err)?;
                }
            }
        }
        Ok(())
    }
}

fn to_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Training-loss curves, one line per task over its own steps.
///
/// # Errors
/// No finite loss to plot, or a drawing error.
pub fn loss_curves(title: &str, curves: &[LossCurve]) -> Result<Figure, ReportError> {
    let finite = || {
        curves
            .iter()
            .flat_map(|c| c.steps.iter().zip(&c.loss))
            .filter(|(_, l)| l.is_finite())
    };
    let max_step = finite()
        .map(|(s, _)| *s)
        .max()
        .ok_or_else(|| ReportError::Plot(format!("{title}: no finite training loss to plot")))?;
    let max_loss = finite().map(|(_, l)| *l).fold(f64::MIN, f64::max);
    let min_loss = finite().map(|(_, l)| *l).fold(f64::MAX, f64::min);
    let y0 = min_loss.min(0.0);
    let y1 = if max_loss > y0 {
        max_loss * 1.05
    } else {
        y0 + 1.0
    };
    let x1 = (max_step as f64).max(2.0);
    render(
        (720, 420),
        &Losses {
            title,
            curves,
            x: (1.0, x1),
            y: (y0, y1),
        },
    )
}

struct Losses<'a> {
    title: &'a str,
    curves: &'a [LossCurve],
    x: (f64, f64),
    y: (f64, f64),
}

impl Draw for Losses<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), ReportError> {
        let (title, curves, x, y) = (self.title, self.curves, self.x, self.y);
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, TITLE_PX))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            // Steps are whole numbers: at most one label per step, none between.
            .x_labels(usize::try_from(x.1 as u64).unwrap_or(10).clamp(2, 10))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .x_desc("step within the task")
            .y_desc("training loss")
            .label_style((FONT, 12.0))
            .axis_desc_style((FONT, 13.0))
            .draw()
            .map_err(plot_err)?;
        for (i, c) in curves.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = c
                .steps
                .iter()
                .zip(&c.loss)
                .filter(|(_, l)| l.is_finite())
                .map(|(s, l)| (*s as f64, *l))
                .collect();
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(plot_err)?
                .label(c.task.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            // Losses fall from their first steps, so the lower left is the emptiest corner.
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, 12.0))
            .draw()
            .map_err(plot_err)?;
        Ok(())
    }
}
