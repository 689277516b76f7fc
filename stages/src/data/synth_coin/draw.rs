//! Drawing primitives for the synthetic CoIN images: filled rectangles, circles, triangles and a
//! 5x7 bitmap font, on an `image::RgbImage`.
//!
//! The visual vocabulary is deliberately small (four colours, three shapes, seventeen large
//! glyphs) so that a 4M-parameter LLaVA looking at 64x64 images can learn every task. All
//! drawing is integer arithmetic on pixel centres, so the same scene always gives the same
//! bytes on every platform.

use image::{Rgb, RgbImage};

/// The colours objects are drawn in, with the word used for them in questions and answers.
pub const COLORS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [50, 80, 220]),
    ("yellow", [235, 200, 30]),
];

/// The shapes of the multi-object scenes.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// Background grey of every scene (light, so every object colour stands out).
pub const BACKGROUND: [u8; 3] = [225, 225, 225];

/// An axis-aligned box in pixels, `x1,y1` inclusive, `x2,y2` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x1: u32,
    pub y1: u32,
    pub x2: u32,
    pub y2: u32,
}

/// A canvas with the drawing operations the scenes need.
pub struct Canvas {
    pub img: RgbImage,
}

impl Canvas {
    /// A `size`x`size` canvas filled with `bg`.
    pub fn new(size: u32, bg: [u8; 3]) -> Self {
        Self {
            img: RgbImage::from_pixel(size, size, Rgb(bg)),
        }
    }

    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, Rgb(c));
        }
    }

    /// Fill a rectangle (clipped to the canvas).
    pub fn rect(&mut self, r: Rect, c: [u8; 3]) {
        for y in r.y1..r.y2 {
            for x in r.x1..r.x2 {
                self.put(i64::from(x), i64::from(y), c);
            }
        }
    }

    /// Fill the circle inscribed in `r`.
    pub fn circle(&mut self, r: Rect, c: [u8; 3]) {
        // Twice the coordinates so that pixel centres (x + 0.5) stay integers.
        let (cx2, cy2) = (i64::from(r.x1 + r.x2), i64::from(r.y1 + r.y2));
        let rad2 = i64::from((r.x2 - r.x1).min(r.y2 - r.y1));
        for y in r.y1..r.y2 {
            for x in r.x1..r.x2 {
                let dx = 2 * i64::from(x) + 1 - cx2;
                let dy = 2 * i64::from(y) + 1 - cy2;
                if dx * dx + dy * dy <= rad2 * rad2 {
                    self.put(i64::from(x), i64::from(y), c);
                }
            }
        }
    }

    /// Fill the upward triangle inscribed in `r` (apex at the top middle).
    pub fn triangle(&mut self, r: Rect, c: [u8; 3]) {
        let w = i64::from(r.x2 - r.x1);
        let h = i64::from(r.y2 - r.y1);
        for y in r.y1..r.y2 {
            // Half-width grows linearly from the apex row to the base row.
            let row = i64::from(y - r.y1) * 2 + 1;
            let half2 = row * w / (2 * h); // twice the half width, in pixels
            let mid2 = i64::from(r.x1 + r.x2);
            for x in r.x1..r.x2 {
                let dx = (2 * i64::from(x) + 1 - mid2).abs();
                if dx <= half2 {
                    self.put(i64::from(x), i64::from(y), c);
                }
            }
        }
    }

    /// Draw one of [`SHAPES`] filling `r`.
    pub fn shape(&mut self, shape: &str, r: Rect, c: [u8; 3]) {
        match shape {
            "circle" => self.circle(r, c),
            "triangle" => self.triangle(r, c),
            _ => self.rect(r, c),
        }
    }

    /// Draw `text` with the bitmap font, top-left at `(x, y)`, each font pixel a `scale`
    /// square; returns the box the text covers. Characters without a glyph are skipped (they
    /// still advance).
    pub fn text(&mut self, text: &str, x: u32, y: u32, scale: u32, c: [u8; 3]) -> Rect {
        let mut cx = x;
        for ch in text.chars() {
            if let Some(rows) = glyph(ch) {
                for (gy, row) in rows.iter().enumerate() {
                    for gx in 0..5u32 {
                        if row & (0b10000 >> gx) != 0 {
                            let px = cx + gx * scale;
                            let py = y + gy as u32 * scale;
                            self.rect(
                                Rect {
                                    x1: px,
                                    y1: py,
                                    x2: px + scale,
                                    y2: py + scale,
                                },
                                c,
                            );
                        }
                    }
                }
            }
            cx += 6 * scale;
        }
        Rect {
            x1: x,
            y1: y,
            x2: x + text_width(text, scale),
            y2: y + 7 * scale,
        }
    }
}

/// Width in pixels of `text` at `scale` (5 columns per glyph, 1 column gap between glyphs).
pub fn text_width(text: &str, scale: u32) -> u32 {
    let n = text.chars().count() as u32;
    if n == 0 { 0 } else { (6 * n - 1) * scale }
}

/// The letters the font has (every word the generator writes uses only these).
pub const FONT_LETTERS: &str = "ABCDEGHKMNOPRSTUY";

/// The 5x7 glyph of `ch` (rows top to bottom, bit 4 = leftmost column).
pub fn glyph(ch: char) -> Option<[u8; 7]> {
    let rows: [&str; 7] = match ch.to_ascii_uppercase() {
        'A' => [
            ".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'B' => [
            "####.", "#...#", "#...#", "####.", "#...#", "#...#", "####.",
        ],
        'C' => [
            ".###.", "#...#", "#....", "#....", "#....", "#...#", ".###.",
        ],
        'D' => [
            "####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####.",
        ],
        'E' => [
            "#####", "#....", "#....", "####.", "#....", "#....", "#####",
        ],
        'G' => [
            ".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####",
        ],
        'H' => [
            "#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'K' => [
            "#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#",
        ],
        'M' => [
            "#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#",
        ],
        'N' => [
            "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#",
        ],
        'O' => [
            ".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'P' => [
            "####.", "#...#", "#...#", "####.", "#....", "#....", "#....",
        ],
        'R' => [
            "####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#",
        ],
        'S' => [
            ".####", "#....", "#....", ".###.", "....#", "....#", "####.",
        ],
        'T' => [
            "#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#..",
        ],
        'U' => [
            "#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'Y' => [
            "#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#..",
        ],
        _ => return None,
    };
    let mut out = [0u8; 7];
    for (o, r) in out.iter_mut().zip(rows) {
        *o = r.bytes().fold(0, |acc, b| (acc << 1) | u8::from(b == b'#'));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_font_letter_has_a_distinct_glyph() {
        let glyphs: Vec<_> = FONT_LETTERS
            .chars()
            .map(|c| glyph(c).expect("glyph"))
            .collect();
        for (i, a) in glyphs.iter().enumerate() {
            for b in &glyphs[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(glyph('a'), glyph('A'));
        assert_eq!(glyph('Q'), None);
    }

    #[test]
    fn shapes_stay_inside_their_box_and_differ() {
        let r = Rect {
            x1: 10,
            y1: 10,
            x2: 30,
            y2: 30,
        };
        let mut counts = Vec::new();
        for s in SHAPES {
            let mut c = Canvas::new(40, BACKGROUND);
            c.shape(s, r, [0, 0, 0]);
            let mut n = 0;
            for (x, y, p) in c.img.enumerate_pixels() {
                if p.0 == [0, 0, 0] {
                    n += 1;
                    assert!(
                        (10..30).contains(&x) && (10..30).contains(&y),
                        "{s} leaks at {x},{y}"
                    );
                }
            }
            counts.push(n);
        }
        // square 400 > circle (~314) > triangle (~200)
        assert_eq!(counts[1], 400);
        assert!(counts[0] > 280 && counts[0] < 340, "{counts:?}");
        assert!(counts[2] > 170 && counts[2] < 230, "{counts:?}");
    }

    #[test]
    fn text_box_matches_drawn_pixels() {
        let mut c = Canvas::new(64, BACKGROUND);
        let r = c.text("MOON", 2, 3, 2, [0, 0, 0]);
        assert_eq!(
            r,
            Rect {
                x1: 2,
                y1: 3,
                x2: 2 + 46,
                y2: 3 + 14
            }
        );
        let inked = c.img.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(inked > 0);
        assert!(
            c.img
                .enumerate_pixels()
                .all(|(x, y, p)| p.0 != [0, 0, 0]
                    || (x >= r.x1 && x < r.x2 && y >= r.y1 && y < r.y2))
        );
    }
}
