//! One generator per CoIN task (plus the captioning pretraining split): each draws a random
//! scene, renders it and asks one question in the task's native answer style.
//!
//! | task | scene | native answer |
//! |---|---|---|
//! | ScienceQA | one large object (shape), or one to four small ones | option letter (shape, colour or count among 3-4 options) |
//! | TextVQA | a word written in coloured glyphs | the word, lower case |
//! | ImageNet | one of six drawn object classes | the class name |
//! | GQA | two objects of different colours sharing a row or a column | a relation word, or the colour at a relation |
//! | VizWiz | one large object, or a dark noisy frame (30 %) | colour/shape, or `unanswerable` |
//! | Grounding | two to four objects of different colours | the referred object's box, normalized |
//! | VQAv2 | up to six objects | a count, or a colour |
//! | OCRVQA | a book cover (genre colour, title panel) | the title, the genre, or Yes/No |
//!
//! Multi-object scenes place objects in distinct cells of a 3x3 grid (one box per cell), so
//! relations and boxes are unambiguous and coarse enough for a 64x64 image; captions that
//! show such scenes name every object's cell. Every sample also
//! carries its scene's ground truth as short sentences ([`Sample::facts`]) and a question type,
//! which ASD uses to write explanations and pick distractors.

use image::RgbImage;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};

use super::draw::{BACKGROUND, COLORS, Canvas, Rect, SHAPES, text_width};
use crate::data::coin::format_bbox;

/// The short-answer instruction CoIN appends to VQA-style questions.
pub const SHORT_INSTRUCTION: &str = "Answer the question using a single word or phrase.";
/// ScienceQA's instruction.
pub const MCQ_INSTRUCTION: &str =
    "Answer with the option's letter from the given choices directly.";
/// VizWiz's extra instruction line.
pub const VIZWIZ_INSTRUCTION: &str =
    "When the provided information is insufficient, respond with 'Unanswerable'.";
/// Grounding's question prefix.
pub const GROUNDING_PREFIX: &str =
    "Please provide the bounding box coordinate of the region this sentence describes: ";

/// Words written in TextVQA scenes (only letters of the bitmap font).
pub const WORDS: [&str; 12] = [
    "CAT", "DOG", "SUN", "HAT", "PEN", "CUP", "MAP", "BUS", "KEY", "BED", "ANT", "OAK",
];
/// Book titles on OCRVQA covers.
pub const TITLES: [&str; 8] = [
    "MOON", "STAR", "SONG", "CAKE", "BOAT", "GAME", "ROAD", "NEST",
];
/// Book genres, one per cover colour (index into [`COLORS`]).
pub const GENRES: [&str; 4] = ["Romance", "Cookbooks", "Travel", "Humor"];
/// ImageNet-like object classes.
pub const CLASSES: [&str; 6] = ["house", "tree", "car", "sun", "flag", "fish"];

const ROWS: [&str; 3] = ["top", "middle", "bottom"];
const COLS: [&str; 3] = ["left", "center", "right"];
const NUMBERS: [&str; 7] = ["zero", "one", "two", "three", "four", "five", "six"];

/// One generated question with its image.
pub struct Sample {
    /// The question, ending with the task's instruction line (no `<image>` marker).
    pub question: String,
    /// The native-style answer.
    pub answer: String,
    /// Question type (distractors for ASD come from answers of the same type).
    pub qtype: &'static str,
    /// The scene's ground truth as sentences.
    pub facts: Vec<String>,
    /// Grounding: the normalized box (same string as the answer).
    pub bbox: Option<String>,
    /// The rendered image.
    pub image: RgbImage,
}

/// An object of a multi-object scene.
#[derive(Clone, Copy)]
struct Obj {
    color: usize,
    shape: usize,
    row: usize,
    col: usize,
    rect: Rect,
}

impl Obj {
    fn name(&self) -> String {
        format!("{} {}", COLORS[self.color].0, SHAPES[self.shape])
    }
    /// The grid cell in words: `center` or `top left`.
    fn cell(&self) -> String {
        if self.row == 1 && self.col == 1 {
            "center".to_string()
        } else {
            format!("{} {}", ROWS[self.row], COLS[self.col])
        }
    }
    fn fact(&self) -> String {
        format!(
            "There is a {} in the {} of the image.",
            self.name(),
            self.cell()
        )
    }
}

/// The box of grid cell (row, col): centred, 3/4 of the cell wide.
///
/// Every object of a cell gets this same box. With jitter (±2 px, the earlier versions), a
/// box's digits carried noise the tiny model cannot see at 8-px patches, and its greedy
/// boxes mixed the modes of different cells (`[0.34, 0.05, 0.95, 0.91]`); jitter-free, each
/// cell has one box string, and Grounding asks what it should: which cell holds the named
/// object. Within a scene objects still differ in cell, colour and shape.
fn cell_rect(size: u32, row: usize, col: usize) -> Rect {
    let cell = size / 3;
    let side = (cell * 3 / 4).max(3);
    let x1 = col as u32 * cell + (cell - side) / 2;
    let y1 = row as u32 * cell + (cell - side) / 2;
    Rect {
        x1,
        y1,
        x2: x1 + side,
        y2: y1 + side,
    }
}

/// What must differ between the objects of a scene (besides their cells).
#[derive(Clone, Copy, PartialEq)]
enum Distinct {
    /// Nothing: colours and shapes drawn independently.
    No,
    /// Every (colour, shape) pair.
    Pairs,
    /// Every colour (at most [`COLORS`]`.len()` objects), shapes drawn independently: the
    /// colour alone names an object, so a question about "the red circle" can be answered by
    /// a model that sees colours and positions even where it does not yet tell shapes apart.
    Colors,
}

/// A square box of half to three quarters of the image at a random place.
fn big_rect(rng: &mut StdRng, size: u32) -> Rect {
    let side = rng.random_range(size / 2..=size * 3 / 4);
    let x = rng.random_range(0..=size - side);
    let y = rng.random_range(0..=size - side);
    Rect {
        x1: x,
        y1: y,
        x2: x + side,
        y2: y + side,
    }
}

/// `n` objects in distinct cells, distinct as `distinct` says.
fn place(rng: &mut StdRng, size: u32, n: usize, distinct: Distinct) -> Vec<Obj> {
    let mut cells: Vec<usize> = (0..9).collect();
    cells.shuffle(rng);
    let mut kinds: Vec<(usize, usize)> = (0..COLORS.len())
        .flat_map(|c| (0..SHAPES.len()).map(move |s| (c, s)))
        .collect();
    kinds.shuffle(rng);
    let mut colors: Vec<usize> = (0..COLORS.len()).collect();
    colors.shuffle(rng);
    (0..n)
        .map(|i| {
            let (color, shape) = match distinct {
                Distinct::Pairs => kinds[i],
                Distinct::Colors => (colors[i % colors.len()], rng.random_range(0..SHAPES.len())),
                Distinct::No => (
                    rng.random_range(0..COLORS.len()),
                    rng.random_range(0..SHAPES.len()),
                ),
            };
            let (row, col) = (cells[i] / 3, cells[i] % 3);
            Obj {
                color,
                shape,
                row,
                col,
                rect: cell_rect(size, row, col),
            }
        })
        .collect()
}

fn render(size: u32, objs: &[Obj]) -> RgbImage {
    let mut c = Canvas::new(size, BACKGROUND);
    for o in objs {
        c.shape(SHAPES[o.shape], o.rect, COLORS[o.color].1);
    }
    c.img
}

/// Glyph scale of book titles (four letters across a cover).
fn glyph_scale(size: u32) -> u32 {
    (size / 32).max(1)
}

/// Glyph scale of TextVQA's words: three letters over most of the width (15x21 pixels a
/// letter at 64 px, two by three patches), large enough for the tiny tower to read.
fn word_scale(size: u32) -> u32 {
    (size * 3 / 64).max(1)
}

fn plural(shape: &str) -> String {
    format!("{shape}s")
}

/// Options as `A. x` lines, every option of the pool in its fixed order, and the answer's
/// letter.
///
/// The order is fixed per question type, so the letter names the answer as a class label
/// does. With options shuffled per question, a 4-layer model must match an option's word to
/// the image and copy the letter before it; trained jointly on 160 such questions it answered
/// one letter for all (30 % on the test set, chance). A fixed order keeps ScienceQA's answer
/// style (a letter out of listed options) and makes it a perception task like the others.
fn options(correct: &str, pool: &[String]) -> (String, String) {
    let letters = ["A", "B", "C", "D", "E"];
    let lines: Vec<String> = pool
        .iter()
        .zip(letters)
        .map(|(o, l)| format!("{l}. {o}"))
        .collect();
    let idx = pool.iter().position(|o| o == correct).unwrap_or(0);
    (lines.join("\n"), letters[idx].to_string())
}

/// ScienceQA: multiple choice about shape, colour or count.
pub fn science_qa(rng: &mut StdRng, size: u32) -> Sample {
    let qtype = *["shape", "color", "count"].choose(rng).unwrap_or(&"shape");
    let n = if qtype == "count" {
        rng.random_range(1..=4)
    } else {
        1
    };
    let mut objs = place(rng, size, n, Distinct::No);
    if qtype == "shape" {
        // One large object, as VizWiz shows it: at two patches a side (a grid cell) a shape is
        // too small for the tiny tower to tell apart reliably, at four to six it is not.
        objs[0].rect = big_rect(rng, size);
    }
    if qtype == "count" {
        // Same shape and colour, so "objects" is unambiguous.
        let (c, s) = (objs[0].color, objs[0].shape);
        objs.iter_mut().for_each(|o| (o.color, o.shape) = (c, s));
    }
    let (q, correct, pool): (String, String, Vec<String>) = match qtype {
        "shape" => (
            "Which shape is shown in the image?".into(),
            SHAPES[objs[0].shape].into(),
            SHAPES.iter().map(|s| (*s).into()).collect(),
        ),
        "color" => (
            "What color is the shape in the image?".into(),
            COLORS[objs[0].color].0.into(),
            COLORS.iter().map(|c| c.0.into()).collect(),
        ),
        _ => (
            "How many shapes are in the image?".into(),
            n.to_string(),
            (1..=4).map(|k: usize| k.to_string()).collect(),
        ),
    };
    let (lines, letter) = options(&correct, &pool);
    let mut facts: Vec<String> = objs.iter().map(Obj::fact).collect();
    if qtype == "count" {
        facts.push(format!("There are {} shapes in total.", NUMBERS[n]));
    }
    Sample {
        question: format!("{q}\n{lines}\n{MCQ_INSTRUCTION}"),
        answer: letter,
        qtype,
        facts,
        bbox: None,
        image: render(size, &objs),
    }
}

/// TextVQA: a word in coloured glyphs at a random place.
pub fn text_vqa(rng: &mut StdRng, size: u32) -> Sample {
    let word = *WORDS.choose(rng).unwrap_or(&WORDS[0]);
    let color = rng.random_range(0..COLORS.len());
    let scale = word_scale(size);
    let (w, h) = (text_width(word, scale), 7 * scale);
    // The word starts on the tiny model's patch grid (an eighth of the image): a letter then
    // falls on its patches the same way wherever the word is, so the 2-layer tower sees a
    // dozen patch patterns per letter instead of 64 sub-patch shifts of each (trained on
    // free placement, it did not learn to read any word in an epoch of captions).
    let step = (size / 8).max(1);
    let x = step * rng.random_range(0..=size.saturating_sub(w + 1) / step);
    let y = step * rng.random_range(0..=size.saturating_sub(h + 1) / step);
    let mut c = Canvas::new(size, BACKGROUND);
    c.text(word, x, y, scale, COLORS[color].1);
    let q = *[
        "What word is written in the image?",
        "What does the text in the image say?",
    ]
    .choose(rng)
    .unwrap_or(&"");
    let where_ = ROWS[((y + h / 2) * 3 / size) as usize];
    Sample {
        question: format!("{q}\n{SHORT_INSTRUCTION}"),
        answer: word.to_lowercase(),
        qtype: "word",
        facts: vec![format!(
            "The word {word} is written in {} letters near the {where_} of the image.",
            COLORS[color].0
        )],
        bbox: None,
        image: c.img,
    }
}

/// ImageNet: one drawn object class.
pub fn imagenet(rng: &mut StdRng, size: u32) -> Sample {
    let class = rng.random_range(0..CLASSES.len());
    let s = size as i64;
    let side = rng.random_range(s * 5 / 8..=s * 7 / 8);
    let x0 = rng.random_range(0..=s - side) as u32;
    let y0 = rng.random_range(0..=s - side) as u32;
    let side = side as u32;
    let r = |fx1: u32, fy1: u32, fx2: u32, fy2: u32| Rect {
        x1: x0 + side * fx1 / 16,
        y1: y0 + side * fy1 / 16,
        x2: x0 + side * fx2 / 16,
        y2: y0 + side * fy2 / 16,
    };
    let mut c = Canvas::new(size, BACKGROUND);
    let (brown, black, grey) = ([130, 80, 40], [30, 30, 30], [120, 120, 120]);
    let fact = match CLASSES[class] {
        "house" => {
            c.rect(r(3, 8, 13, 16), COLORS[0].1);
            c.triangle(r(1, 1, 15, 8), brown);
            c.rect(r(7, 11, 9, 16), black);
            "a square wall with a door under a triangular brown roof"
        }
        "tree" => {
            c.rect(r(7, 9, 9, 16), brown);
            c.circle(r(2, 0, 14, 11), COLORS[1].1);
            "a round green crown on a thin brown trunk"
        }
        "car" => {
            c.rect(r(1, 6, 15, 12), COLORS[2].1);
            c.rect(r(4, 3, 12, 6), COLORS[2].1);
            c.circle(r(2, 10, 6, 14), black);
            c.circle(r(10, 10, 14, 14), black);
            "a blue body on two black wheels"
        }
        "sun" => {
            c.rect(r(7, 0, 9, 16), COLORS[3].1);
            c.rect(r(0, 7, 16, 9), COLORS[3].1);
            c.circle(r(3, 3, 13, 13), COLORS[3].1);
            "a yellow disc with four rays"
        }
        "flag" => {
            c.rect(r(2, 1, 3, 16), grey);
            c.rect(r(3, 1, 14, 8), COLORS[0].1);
            "a red cloth hanging from a grey pole"
        }
        _ => {
            c.circle(r(1, 4, 11, 12), COLORS[3].1);
            c.rect(r(3, 6, 10, 10), COLORS[3].1);
            c.triangle(r(10, 4, 16, 12), COLORS[2].1);
            c.rect(r(3, 6, 4, 7), black);
            "a yellow body with a blue tail fin"
        }
    };
    Sample {
        question: format!("What is the object in the image?\n{SHORT_INSTRUCTION}"),
        answer: CLASSES[class].into(),
        qtype: "class",
        facts: vec![format!(
            "The drawing shows {fact}, which is what a {} looks like.",
            CLASSES[class]
        )],
        bbox: None,
        image: c.img,
    }
}

/// GQA: the relation between two objects sharing a row or a column.
pub fn gqa(rng: &mut StdRng, size: u32) -> Sample {
    let mut objs = place(rng, size, 2, Distinct::Colors);
    // Move the second object into the first one's row or column (a cell it does not occupy).
    let same_row = rng.random_bool(0.5);
    let (r0, c0) = (objs[0].row, objs[0].col);
    let choices: Vec<usize> = (0..3)
        .filter(|&k| if same_row { k != c0 } else { k != r0 })
        .collect();
    let k = *choices.choose(rng).unwrap_or(&0);
    let (row, col) = if same_row { (r0, k) } else { (k, c0) };
    objs[1].row = row;
    objs[1].col = col;
    objs[1].rect = cell_rect(size, row, col);
    let (a, b) = (objs[0], objs[1]);
    let rel = if same_row {
        if a.col < b.col { "left" } else { "right" }
    } else if a.row < b.row {
        "above"
    } else {
        "below"
    };
    let phrase = match rel {
        "left" => "to the left of",
        "right" => "to the right of",
        other => other,
    };
    let (question, answer, qtype) = if rng.random_bool(0.5) {
        (
            format!("Where is the {} relative to the {}?", a.name(), b.name()),
            rel.to_string(),
            "relation",
        )
    } else {
        (
            format!("What color is the shape {phrase} the {}?", b.name()),
            COLORS[a.color].0.to_string(),
            "color_at",
        )
    };
    let mut facts: Vec<String> = objs.iter().map(Obj::fact).collect();
    facts.push(format!(
        "The {} in the {} is {phrase} the {} in the {}.",
        a.name(),
        a.cell(),
        b.name(),
        b.cell()
    ));
    Sample {
        question: format!("{question}\n{SHORT_INSTRUCTION}"),
        answer,
        qtype,
        facts,
        bbox: None,
        image: render(size, &objs),
    }
}

/// VizWiz: a large single object, or an unusable dark frame.
pub fn vizwiz(rng: &mut StdRng, size: u32) -> Sample {
    let ask_color = rng.random_bool(0.5);
    let q = if ask_color {
        "What color is this?"
    } else {
        "What shape is this?"
    };
    let question = format!("{q}\n{VIZWIZ_INSTRUCTION}\n{SHORT_INSTRUCTION}");
    if rng.random_bool(0.3) {
        // A dark, noisy frame: nothing can be seen, so the question cannot be answered.
        let mut c = Canvas::new(size, [25, 25, 25]);
        for p in c.img.pixels_mut() {
            let v = rng.random_range(10..60u8);
            p.0 = [v, v, v];
        }
        return Sample {
            question,
            answer: "unanswerable".into(),
            qtype: "unanswerable",
            facts: vec![
                "The photo is almost black and shows only noise, so no object can be seen.".into(),
            ],
            bbox: None,
            image: c.img,
        };
    }
    let (color, shape) = (
        rng.random_range(0..COLORS.len()),
        rng.random_range(0..SHAPES.len()),
    );
    let mut c = Canvas::new(size, BACKGROUND);
    c.shape(SHAPES[shape], big_rect(rng, size), COLORS[color].1);
    Sample {
        question,
        answer: if ask_color {
            COLORS[color].0.into()
        } else {
            SHAPES[shape].into()
        },
        qtype: if ask_color { "color" } else { "shape" },
        facts: vec![format!(
            "The photo shows one large {} {} filling most of the frame.",
            COLORS[color].0, SHAPES[shape]
        )],
        bbox: None,
        image: c.img,
    }
}

/// An object's box normalized to the image, as Grounding answers it.
fn obj_box(o: &Obj, size: u32) -> String {
    rect_box(o.rect, size)
}

/// A pixel box normalized to the image, as Grounding writes it.
fn rect_box(r: Rect, size: u32) -> String {
    let s = f64::from(size);
    format_bbox([
        f64::from(r.x1) / s,
        f64::from(r.y1) / s,
        f64::from(r.x2) / s,
        f64::from(r.y2) / s,
    ])
}

/// Grounding: the box of the referred object among two to four distinct ones.
pub fn grounding(rng: &mut StdRng, size: u32) -> Sample {
    let n = rng.random_range(2..=4);
    let objs = place(rng, size, n, Distinct::Colors);
    let t = objs[rng.random_range(0..n)];
    let bbox = obj_box(&t, size);
    Sample {
        question: format!("{GROUNDING_PREFIX}{}.", t.name()),
        answer: bbox.clone(),
        qtype: "box",
        facts: objs.iter().map(Obj::fact).collect(),
        bbox: Some(bbox),
        image: render(size, &objs),
    }
}

/// VQAv2: count a shape, or name the colour of the only object of a shape.
pub fn vqav2(rng: &mut StdRng, size: u32) -> Sample {
    let target = rng.random_range(0..SHAPES.len());
    let others: Vec<usize> = (0..SHAPES.len()).filter(|&s| s != target).collect();
    let count_q = rng.random_bool(0.5);
    let k = if count_q { rng.random_range(1..=4) } else { 1 };
    let extra = rng.random_range(0..=2);
    let mut objs = place(rng, size, k + extra, Distinct::No);
    for (i, o) in objs.iter_mut().enumerate() {
        o.shape = if i < k {
            target
        } else {
            *others.choose(rng).unwrap_or(&0)
        };
    }
    let shape = SHAPES[target];
    let (question, answer, qtype) = if count_q {
        (
            format!("How many {} are there?", plural(shape)),
            k.to_string(),
            "count",
        )
    } else {
        (
            format!("What color is the {shape}?"),
            COLORS[objs[0].color].0.to_string(),
            "color",
        )
    };
    let mut facts: Vec<String> = objs.iter().map(Obj::fact).collect();
    let noun = if k == 1 {
        shape.to_string()
    } else {
        plural(shape)
    };
    facts.push(format!("Counting them gives {} {noun}.", NUMBERS[k]));
    Sample {
        question: format!("{question}\n{SHORT_INSTRUCTION}"),
        answer,
        qtype,
        facts,
        bbox: None,
        image: render(size, &objs),
    }
}

/// OCRVQA: a book cover; the title, the genre (cover colour), or a yes/no genre question.
pub fn ocr_vqa(rng: &mut StdRng, size: u32) -> Sample {
    let (image, genre, title) = book_cover(rng, size);
    let pretty = title_case(title);
    let (question, answer, qtype) = match rng.random_range(0..3) {
        0 => (
            "What is the title of this book?".to_string(),
            pretty.clone(),
            "title",
        ),
        1 => (
            "What is the genre of this book?".to_string(),
            GENRES[genre].to_string(),
            "genre",
        ),
        _ => {
            let asked = if rng.random_bool(0.5) {
                genre
            } else {
                rng.random_range(0..GENRES.len())
            };
            let yes = if asked == genre { "Yes" } else { "No" };
            (
                format!("Is this a {} book?", GENRES[asked]),
                yes.to_string(),
                "is_genre",
            )
        }
    };
    Sample {
        question: format!("{question}\n{SHORT_INSTRUCTION}"),
        answer,
        qtype,
        facts: vec![
            format!(
                "The cover is {} with a white title panel that reads {title}.",
                COLORS[genre].0
            ),
            format!(
                "A {} cover marks a {} book.",
                COLORS[genre].0, GENRES[genre]
            ),
        ],
        bbox: None,
        image,
    }
}

/// A book cover: the genre's colour (index into [`COLORS`]) with a white panel holding the
/// title in dark capitals.
fn book_cover(rng: &mut StdRng, size: u32) -> (RgbImage, usize, &'static str) {
    let genre = rng.random_range(0..GENRES.len());
    let title = *TITLES.choose(rng).unwrap_or(&TITLES[0]);
    let scale = glyph_scale(size);
    let margin = size / 16;
    let mut c = Canvas::new(size, BACKGROUND);
    c.rect(
        Rect {
            x1: margin,
            y1: 0,
            x2: size - margin,
            y2: size,
        },
        COLORS[genre].1,
    );
    let tw = text_width(title, scale);
    // On the patch grid, as TextVQA's words: the title then looks the same to the tower
    // wherever the panel is.
    let step = (size / 8).max(1);
    let ty = step * rng.random_range(margin.div_ceil(step)..=(size / 3) / step);
    c.rect(
        Rect {
            x1: margin,
            y1: ty - scale.min(ty),
            x2: size - margin,
            y2: ty + 8 * scale,
        },
        [250, 250, 250],
    );
    c.text(title, (size - tw) / 2, ty, scale, [20, 20, 20]);
    (c.img, genre, title)
}

/// `MOON` -> `Moon`, as OCR-VQA's answers write titles.
fn title_case(title: &str) -> String {
    let lower = title.to_lowercase();
    let mut c = lower.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// Prompts of the captioning split (none is one of the eight task instructions).
const CAPTION_PROMPTS: [&str; 4] = [
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "Write a brief description of the image.",
    "Summarize what the picture shows.",
];

/// A captioning sample for the pretraining split: the question is a caption prompt and the
/// answer a caption naming colours, shapes, places, counts, words, classes and book titles;
/// one kind is a grounded caption (objects by letter with their boxes). No questions, options
/// or task instructions.
pub fn caption(rng: &mut StdRng, size: u32) -> Sample {
    let prompt = *CAPTION_PROMPTS.choose(rng).unwrap_or(&CAPTION_PROMPTS[0]);
    let (answer, image) = match rng.random_range(0..6) {
        0 => {
            let n = rng.random_range(1..=3);
            let objs = place(rng, size, n, Distinct::Pairs);
            let parts: Vec<String> = objs
                .iter()
                .map(|o| format!("a {} in the {}", o.name(), o.cell()))
                .collect();
            (
                capitalize(&format!("{}.", parts.join(" and "))),
                render(size, &objs),
            )
        }
        1 => {
            let n = rng.random_range(1..=4);
            let mut objs = place(rng, size, n, Distinct::No);
            let (c, s) = (objs[0].color, objs[0].shape);
            objs.iter_mut().for_each(|o| (o.color, o.shape) = (c, s));
            let n = objs.len();
            let noun = if n == 1 {
                SHAPES[s].to_string()
            } else {
                plural(SHAPES[s])
            };
            // Where they are, too: a caption kind that shows objects in cells without naming
            // the cells would make every position word a label the image cannot predict
            // (`train.vision` learned none of them while counts never named places).
            let cells: Vec<String> = objs.iter().map(|o| format!("the {}", o.cell())).collect();
            (
                capitalize(&format!(
                    "{} {} {noun}, in {}.",
                    NUMBERS[n],
                    COLORS[c].0,
                    join_and(&cells)
                )),
                render(size, &objs),
            )
        }
        2 => {
            // The word in lower case first, as a TextVQA answer spells it, read off the image;
            // then in capitals, copied. An answer token the language model never had to read
            // off an image in pretraining stays out of a LoRA's reach (with the capitals first,
            // the lower-case word was only ever copied from them).
            let s = text_vqa(rng, size);
            let word = s.answer.to_uppercase();
            (
                format!(
                    "The word {} is written in capital letters: {word}.",
                    s.answer
                ),
                s.image,
            )
        }
        5 => {
            // A grounded caption: objects named by letter, then by colour and shape, then
            // their box (normalized as Grounding writes them) and cell, so option letters and
            // box coordinates are words the model has written before any task. The box follows
            // the name directly, as in a Grounding answer: predicting it teaches "where is the
            // red circle" in one step. (With the cell words before the box, the box was copied
            // from them, a shortcut Grounding's answer does not have.) The cell words keep
            // every caption that shows objects in cells naming them (`train.vision`'s labels).
            let n = rng.random_range(2..=4);
            let objs = place(rng, size, n, Distinct::Pairs);
            let parts: Vec<String> = objs
                .iter()
                .zip(["A", "B", "C", "D"])
                .map(|(o, letter)| {
                    format!(
                        "shape {letter} is a {} at {} in the {}",
                        o.name(),
                        obj_box(o, size),
                        o.cell()
                    )
                })
                .collect();
            (
                capitalize(&format!("{}.", parts.join(" and "))),
                render(size, &objs),
            )
        }
        3 if rng.random_bool(0.5) => {
            let s = imagenet(rng, size);
            (format!("A simple drawing of a {}.", s.answer), s.image)
        }
        3 => {
            // A book cover, by its colour (not its genre: which colour marks which genre is
            // OCR-VQA's to teach) and title, read off the image as OCR-VQA answers it.
            let (image, genre, title) = book_cover(rng, size);
            (
                format!(
                    "A {} book cover with the title {}.",
                    COLORS[genre].0,
                    title_case(title)
                ),
                image,
            )
        }
        _ => {
            let s = gqa(rng, size);
            // The last fact of a GQA scene states the relation.
            (s.facts.last().cloned().unwrap_or_default(), s.image)
        }
    };
    Sample {
        question: prompt.to_string(),
        answer,
        qtype: "caption",
        facts: Vec::new(),
        bbox: None,
        image,
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// The generator of task `name`.
#[must_use]
pub fn generator(name: &str) -> fn(&mut StdRng, u32) -> Sample {
    match name {
        "ScienceQA" => science_qa,
        "TextVQA" => text_vqa,
        "ImageNet" => imagenet,
        "GQA" => gqa,
        "VizWiz" => vizwiz,
        "Grounding" => grounding,
        "VQAv2" => vqav2,
        "OCRVQA" => ocr_vqa,
        _ => caption,
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn iou(a: Rect, b: Rect) -> f64 {
        let w = f64::from(a.x2.min(b.x2).saturating_sub(a.x1.max(b.x1)));
        let h = f64::from(a.y2.min(b.y2).saturating_sub(a.y1.max(b.y1)));
        let area = |r: Rect| f64::from((r.x2 - r.x1) * (r.y2 - r.y1));
        w * h / (area(a) + area(b) - w * h)
    }

    #[test]
    fn cell_boxes_are_one_per_cell_inside_it_and_apart() {
        for size in [32, 64, 96, 128] {
            let cell = size / 3;
            let boxes: Vec<Rect> = (0..9).map(|k| cell_rect(size, k / 3, k % 3)).collect();
            for (k, r) in boxes.iter().enumerate() {
                let (row, col) = ((k / 3) as u32, (k % 3) as u32);
                assert!(
                    r.x1 >= col * cell && r.x2 <= (col + 1) * cell,
                    "{size}: {r:?}"
                );
                assert!(
                    r.y1 >= row * cell && r.y2 <= (row + 1) * cell,
                    "{size}: {r:?}"
                );
                assert!(
                    r.x2 - r.x1 >= cell / 2,
                    "{size}: large enough to see: {r:?}"
                );
                for other in &boxes[k + 1..] {
                    assert!(iou(*r, *other) == 0.0, "{size}: {r:?} overlaps {other:?}");
                }
            }
        }
        // The Grounding answer of a scene is its object's cell box, whatever the seed.
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..50 {
            let s = grounding(&mut rng, 64);
            let want: Vec<String> = (0..9)
                .map(|k| rect_box(cell_rect(64, k / 3, k % 3), 64))
                .collect();
            assert!(want.contains(&s.answer), "{}", s.answer);
        }
    }

    #[test]
    fn every_task_answers_in_its_native_form() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..50 {
            assert!(["A", "B", "C", "D"].contains(&science_qa(&mut rng, 64).answer.as_str()));
            assert!(WORDS.contains(&text_vqa(&mut rng, 64).answer.to_uppercase().as_str()));
            assert!(CLASSES.contains(&imagenet(&mut rng, 64).answer.as_str()));
            let g = grounding(&mut rng, 64);
            assert_eq!(g.bbox.as_deref(), Some(g.answer.as_str()));
            assert!(crate::data::coin::parse_bbox(&g.answer).is_some());
            let o = ocr_vqa(&mut rng, 64);
            assert!(!o.answer.is_empty() && o.question.ends_with(SHORT_INSTRUCTION));
        }
    }
}
