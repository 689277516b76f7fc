//! CLIP image preprocessing, as Hugging Face's `CLIPImageProcessor` (PIL backend) does it, plus
//! LLaVA-1.5's optional pad-to-square.
//!
//! Steps, each switchable from `preprocessor_config.json`:
//!
//! 1. decode and convert to RGB (alpha dropped, grey replicated: PIL's `convert("RGB")`);
//! 2. *(LLaVA `image_aspect_ratio = "pad"`)* paste the image centred on a square canvas filled with
//!    the mean colour `int(mean * 255)`, as LLaVA's `expand2square`;
//! 3. resize so the shortest edge is `size.shortest_edge` (the long edge is `int(size * long /
//!    short)`, truncated) with PIL's resampling filter;
//! 4. centre crop to `crop_size` (`top = (h - crop_h) // 2`, zero padding if the image is smaller);
//! 5. rescale by `rescale_factor` (computed in f64, stored as f32, as numpy does);
//! 6. normalize `(x - mean) / std` in f32; output is channels-first `[3, H, W]`.
//!
//! ## Why we re-implement PIL's resize
//!
//! The `image` crate's `CatmullRom` filter is a different bicubic (a = -0.5 but no antialiasing
//! support scaling, float output); images resized with it differ from PIL by several grey levels,
//! which is far outside the pixel-value tolerance of the parity tests. PIL's `Resample.c`
//! algorithm is short and fully specified: a separable convolution (horizontal pass, then
//! vertical) whose kernel support widens by the downscale factor, with coefficients normalized to
//! sum 1, converted to 22-bit fixed point, and each pass rounded and clamped to `u8`. We implement
//! that algorithm from its description; on the fixture's `image_resize.png` the result matches
//! transformers' recorded `pixel_values` exactly (see the test), i.e. the same `u8` pixels.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};

/// Errors reading images or the processor config.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("cannot read image processor config `{}`", path.display())]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image processor config `{}`: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("image `{}` has a zero-sized side ({width}x{height})", path.display())]
    Empty {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Resampling filter, numbered as PIL's `Image.Resampling` (the config's `resample`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// PIL `BILINEAR` (2): triangle filter, support 1.
    Bilinear,
    /// PIL `BICUBIC` (3): cubic convolution with a = -0.5, support 2.
    Bicubic,
}

/// How `size` is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Shortest edge to this length, aspect ratio kept.
    ShortestEdge(u32),
    /// Exactly this `(height, width)`.
    Exact(u32, u32),
}

/// The `CLIPImageProcessor` settings we honour, plus LLaVA's pad-to-square.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Convert to RGB first (always effectively on: the model needs 3 channels).
    pub do_convert_rgb: bool,
    /// Resize at all.
    pub do_resize: bool,
    /// Target size.
    pub size: ResizeTo,
    /// Filter.
    pub resample: Resample,
    /// Centre crop.
    pub do_center_crop: bool,
    /// Crop `(height, width)`.
    pub crop_size: (u32, u32),
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Usually 1/255.
    pub rescale_factor: f64,
    /// Subtract mean, divide by std.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel std.
    pub image_std: [f32; 3],
    /// LLaVA-1.5 `image_aspect_ratio = "pad"`: pad to a square with the mean colour first.
    pub pad_to_square: bool,
}

/// OpenAI CLIP normalization constants.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP normalization constants.
// Written exactly as in every CLIP `preprocessor_config.json`, so they can be grepped for.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl ImageProcessorConfig {
    /// CLIP defaults for a square model input of `size` pixels (LLaVA-1.5: 336).
    pub fn clip(size: u32) -> Self {
        Self {
            do_convert_rgb: true,
            do_resize: true,
            size: ResizeTo::ShortestEdge(size),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (size, size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            pad_to_square: false,
        }
    }

    /// Reads `preprocessor_config.json`, or `processor_config.json` (its `image_processor` table).
    /// Missing fields take CLIP's defaults; present but malformed ones are errors naming the field.
    pub fn load(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        let err = |msg: String| ImageError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let root: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let v = root.get("image_processor").unwrap_or(&root);
        let mut cfg = Self::clip(224);
        let flag = |name: &str, default: bool| -> Result<bool, ImageError> {
            match v.get(name) {
                None => Ok(default),
                Some(b) => b
                    .as_bool()
                    .ok_or_else(|| err(format!("field `{name}` must be a boolean"))),
            }
        };
        cfg.do_convert_rgb = flag("do_convert_rgb", true)?;
        cfg.do_resize = flag("do_resize", true)?;
        cfg.do_center_crop = flag("do_center_crop", true)?;
        cfg.do_rescale = flag("do_rescale", true)?;
        cfg.do_normalize = flag("do_normalize", true)?;
        let dim = |x: &serde_json::Value, field: &str| -> Result<u32, ImageError> {
            x.as_u64()
                .filter(|&n| n > 0 && n <= 1 << 16)
                .map(|n| n as u32)
                .ok_or_else(|| {
                    err(format!(
                        "field `{field}` must be a positive integer, got {x}"
                    ))
                })
        };
        if let Some(size) = v.get("size") {
            cfg.size = if let Some(s) = size.get("shortest_edge") {
                ResizeTo::ShortestEdge(dim(s, "size.shortest_edge")?)
            } else if let (Some(h), Some(w)) = (size.get("height"), size.get("width")) {
                ResizeTo::Exact(dim(h, "size.height")?, dim(w, "size.width")?)
            } else if size.is_u64() {
                ResizeTo::ShortestEdge(dim(size, "size")?)
            } else {
                return Err(err(format!(
                    "field `size` must be {{\"shortest_edge\": n}} or {{\"height\", \"width\"}}, got {size}"
                )));
            };
        }
        if let Some(crop) = v.get("crop_size") {
            cfg.crop_size = if let (Some(h), Some(w)) = (crop.get("height"), crop.get("width")) {
                (dim(h, "crop_size.height")?, dim(w, "crop_size.width")?)
            } else {
                let s = dim(crop, "crop_size")?;
                (s, s)
            };
        }
        if let Some(r) = v.get("resample") {
            cfg.resample = match r.as_u64() {
                Some(2) => Resample::Bilinear,
                Some(3) => Resample::Bicubic,
                _ => {
                    return Err(err(format!(
                        "field `resample` = {r} is not supported (2 = bilinear, 3 = bicubic)"
                    )));
                }
            };
        }
        if let Some(f) = v.get("rescale_factor") {
            cfg.rescale_factor = f
                .as_f64()
                .ok_or_else(|| err(format!("field `rescale_factor` must be a number, got {f}")))?;
        }
        let triple = |name: &str, dst: &mut [f32; 3]| -> Result<(), ImageError> {
            let Some(x) = v.get(name) else { return Ok(()) };
            let vals: Option<Vec<f64>> = x
                .as_array()
                .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect());
            match vals {
                Some(vals) if vals.len() == 3 && x.as_array().is_some_and(|a| a.len() == 3) => {
                    for (d, s) in dst.iter_mut().zip(vals) {
                        *d = s as f32;
                    }
                    Ok(())
                }
                _ => Err(err(format!(
                    "field `{name}` must be a list of 3 numbers, got {x}"
                ))),
            }
        };
        triple("image_mean", &mut cfg.image_mean)?;
        triple("image_std", &mut cfg.image_std)?;
        if cfg.image_std.contains(&0.0) {
            return Err(err("field `image_std` has a zero entry".to_string()));
        }
        Ok(cfg)
    }

    /// Opens and preprocesses one image file: `[3, H, W]` f32 on `device`.
    pub fn preprocess_file(&self, path: &Path, device: &Device) -> Result<Tensor, ImageError> {
        let img = load_image(path)?;
        self.preprocess(&img, path, device)
    }

    /// Preprocesses several files into one `[n, 3, H, W]` batch.
    pub fn preprocess_files(
        &self,
        paths: &[PathBuf],
        device: &Device,
    ) -> Result<Tensor, ImageError> {
        let images = paths
            .iter()
            .map(|p| self.preprocess_file(p, device))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::stack(&images, 0)?)
    }

    /// Preprocesses a decoded image; `origin` is only used in error messages.
    pub fn preprocess(
        &self,
        img: &DynamicImage,
        origin: &Path,
        device: &Device,
    ) -> Result<Tensor, ImageError> {
        let (w, h) = (img.width(), img.height());
        if w == 0 || h == 0 {
            return Err(ImageError::Empty {
                path: origin.to_path_buf(),
                width: w,
                height: h,
            });
        }
        // The model needs 3 channels whatever `do_convert_rgb` says.
        let mut rgb = img.to_rgb8();
        if self.pad_to_square {
            rgb = expand_to_square(&rgb, self.image_mean);
        }
        if self.do_resize {
            let (nh, nw) = match self.size {
                ResizeTo::Exact(h, w) => (h, w),
                ResizeTo::ShortestEdge(s) => shortest_edge_size(rgb.height(), rgb.width(), s),
            };
            if (nh, nw) != (rgb.height(), rgb.width()) {
                rgb = resize_pil(&rgb, nw, nh, self.resample);
            }
        }
        let (ch, cw) = if self.do_center_crop {
            self.crop_size
        } else {
            (rgb.height(), rgb.width())
        };
        let (top, left) = crop_origin(rgb.height(), rgb.width(), ch, cw);
        let mut data = vec![0f32; 3 * (ch * cw) as usize];
        for c in 0..3usize {
            for y in 0..ch {
                for x in 0..cw {
                    let (sy, sx) = (i64::from(y) + top, i64::from(x) + left);
                    let inside = sy >= 0
                        && sx >= 0
                        && sy < i64::from(rgb.height())
                        && sx < i64::from(rgb.width());
                    let px = if inside {
                        rgb.get_pixel(sx as u32, sy as u32)[c]
                    } else {
                        0
                    };
                    let mut v = f32::from(px);
                    if self.do_rescale {
                        // numpy: image.astype(float64) * scale, then astype(float32).
                        v = (f64::from(px) * self.rescale_factor) as f32;
                    }
                    if self.do_normalize {
                        v = (v - self.image_mean[c]) / self.image_std[c];
                    }
                    data[(c * ch as usize + y as usize) * cw as usize + x as usize] = v;
                }
            }
        }
        Ok(Tensor::from_vec(
            data,
            (3, ch as usize, cw as usize),
            device,
        )?)
    }
}

/// Decodes an image file (format guessed from its bytes), naming the file on failure.
pub fn load_image(path: &Path) -> Result<DynamicImage, ImageError> {
    let read = |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    image::ImageReader::open(path)
        .map_err(|e| read(image::ImageError::IoError(e)))?
        .with_guessed_format()
        .map_err(|e| read(image::ImageError::IoError(e)))?
        .decode()
        .map_err(read)
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: `(height, width)`.
fn shortest_edge_size(h: u32, w: u32, size: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (u64::from(size) * u64::from(long) / u64::from(short)) as u32;
    if w <= h {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// transformers' `center_crop` origin in source coordinates. When the crop is larger than the
/// image, HF first pads it with zeros to the crop size, the image at `ceil((crop - size) / 2)`,
/// so the origin becomes negative and the out-of-image pixels read as 0.
fn crop_origin(h: u32, w: u32, ch: u32, cw: u32) -> (i64, i64) {
    let axis = |size: u32, crop: u32| -> i64 {
        let (size, crop) = (i64::from(size), i64::from(crop));
        if crop > size {
            -((crop - size + 1) / 2)
        } else {
            (size - crop) / 2
        }
    };
    (axis(h, ch), axis(w, cw))
}

/// LLaVA's `expand2square`: centre the image on a square canvas of colour `int(mean * 255)`.
pub fn expand_to_square(img: &RgbImage, mean: [f32; 3]) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let bg = image::Rgb(mean.map(|m| (m * 255.0) as u8));
    let mut out = RgbImage::from_pixel(side, side, bg);
    let (ox, oy) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    image::imageops::replace(&mut out, img, i64::from(ox), i64::from(oy));
    out
}

/// Fixed-point precision of PIL's 8-bit resampler: 32 bits minus 8 for the pixel, minus 2 guard.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn filter(kind: Resample, x: f64) -> f64 {
    let x = x.abs();
    match kind {
        Resample::Bilinear => (1.0 - x).max(0.0),
        Resample::Bicubic => {
            const A: f64 = -0.5;
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
    }
}

fn support(kind: Resample) -> f64 {
    match kind {
        Resample::Bilinear => 1.0,
        Resample::Bicubic => 2.0,
    }
}

/// Per output index: first source index and fixed-point weights (PIL's `precompute_coeffs` +
/// `normalize_coeffs_8bpc`).
fn coefficients(in_size: u32, out_size: u32, kind: Resample) -> Vec<(usize, Vec<i32>)> {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = support(kind) * filterscale;
    let inv = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (f64::from(xx) + 0.5) * scale;
            // Truncation toward zero, as C's (int) cast.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| filter(kind, (x as f64 - center + 0.5) * inv))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|k| *k /= total);
            }
            let one = f64::from(1u32 << PRECISION_BITS);
            let fixed = w
                .iter()
                .map(|&k| {
                    if k < 0.0 {
                        (k * one - 0.5) as i32
                    } else {
                        (k * one + 0.5) as i32
                    }
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL `Image.resize((w, h), resample)` for 8-bit RGB: horizontal pass, then vertical, each
/// rounded to `u8`.
pub fn resize_pil(img: &RgbImage, out_w: u32, out_h: u32, kind: Resample) -> RgbImage {
    let (in_w, in_h) = (img.width(), img.height());
    let round = 1i64 << (PRECISION_BITS - 1);
    let mut cur = img.clone();
    if out_w != in_w {
        let coeffs = coefficients(in_w, out_w, kind);
        let mut tmp = RgbImage::new(out_w, in_h);
        for y in 0..in_h {
            for (x, (xmin, k)) in coeffs.iter().enumerate() {
                let mut acc = [round; 3];
                for (i, &kv) in k.iter().enumerate() {
                    let p = cur.get_pixel((xmin + i) as u32, y);
                    for c in 0..3 {
                        acc[c] += i64::from(p[c]) * i64::from(kv);
                    }
                }
                tmp.put_pixel(x as u32, y, image::Rgb(acc.map(clip8)));
            }
        }
        cur = tmp;
    }
    if out_h != in_h {
        let coeffs = coefficients(in_h, out_h, kind);
        let mut tmp = RgbImage::new(cur.width(), out_h);
        for (y, (ymin, k)) in coeffs.iter().enumerate() {
            for x in 0..cur.width() {
                let mut acc = [round; 3];
                for (i, &kv) in k.iter().enumerate() {
                    let p = cur.get_pixel(x, (ymin + i) as u32);
                    for c in 0..3 {
                        acc[c] += i64::from(p[c]) * i64::from(kv);
                    }
                }
                tmp.put_pixel(x, y as u32, image::Rgb(acc.map(clip8)));
            }
        }
        cur = tmp;
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
    }

    fn recorded(name: &str) -> Tensor {
        let t = candle_core::safetensors::load(fixture().join("inputs.safetensors"), &Device::Cpu)
            .unwrap();
        t[name].clone()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn fixture_images_match_transformers_pixel_values() {
        let cfg = ImageProcessorConfig::load(&fixture().join("preprocessor_config.json")).unwrap();
        assert_eq!(cfg.size, ResizeTo::ShortestEdge(64));
        assert_eq!(cfg.resample, Resample::Bicubic);
        let paths = [fixture().join("image_0.png"), fixture().join("image_1.png")];
        let got = cfg.preprocess_files(&paths, &Device::Cpu).unwrap();
        let diff = max_abs_diff(&got, &recorded("pixel_values"));
        assert!(diff <= 1e-6, "max |diff| = {diff}");
    }

    #[test]
    fn resized_fixture_image_matches_pil_bicubic() {
        // processor_config.json embeds the same settings under `image_processor`.
        let cfg = ImageProcessorConfig::load(&fixture().join("processor_config.json")).unwrap();
        let path = fixture().join("image_resize.png");
        let img = load_image(&path).unwrap();
        assert_ne!(
            img.width(),
            img.height(),
            "the fixture exercises a non-square resize"
        );
        let got = cfg
            .preprocess(&img, &path, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let diff = max_abs_diff(&got, &recorded("pixel_values_resize"));
        // Same u8 pixels as PIL: only f32 rounding of the normalization remains.
        assert!(diff <= 1e-6, "max |diff| = {diff}");
    }

    #[test]
    fn unreadable_image_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.png");
        std::fs::write(&path, b"not a png at all").unwrap();
        let err = load_image(&path).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
        let err = load_image(&dir.path().join("missing.jpg"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.jpg"), "{err}");
    }

    #[test]
    fn bad_config_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preprocessor_config.json");
        std::fs::write(
            &path,
            r#"{"image_mean": [0.5, 0.5], "size": {"shortest_edge": 8}}"#,
        )
        .unwrap();
        let err = ImageProcessorConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("preprocessor_config.json") && err.contains("image_mean"),
            "{err}"
        );
        std::fs::write(&path, r#"{"resample": 1}"#).unwrap();
        let err = ImageProcessorConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("resample"), "{err}");
    }

    #[test]
    fn output_size_and_crop_follow_transformers() {
        assert_eq!(shortest_edge_size(100, 50, 64), (128, 64));
        assert_eq!(shortest_edge_size(50, 75, 64), (64, 96));
        assert_eq!(
            shortest_edge_size(30, 47, 64),
            (64, 100),
            "long edge truncates 100.27"
        );
        assert_eq!(crop_origin(70, 64, 64, 64), (3, 0));
        assert_eq!(
            crop_origin(61, 64, 64, 64),
            (-2, 0),
            "pads ceil(3/2) = 2 above"
        );
    }

    #[test]
    fn pad_to_square_centres_on_mean_colour() {
        let img = RgbImage::from_pixel(4, 2, image::Rgb([255, 0, 0]));
        let sq = expand_to_square(&img, CLIP_MEAN);
        assert_eq!((sq.width(), sq.height()), (4, 4));
        assert_eq!(sq.get_pixel(0, 0).0, [122, 116, 104], "int(mean * 255)");
        assert_eq!(
            sq.get_pixel(0, 1).0,
            [255, 0, 0],
            "pasted at (0, (4 - 2) / 2)"
        );
        assert_eq!(sq.get_pixel(3, 2).0, [255, 0, 0]);
        assert_eq!(sq.get_pixel(3, 3).0, [122, 116, 104]);
        // Through the processor: 16x8 pads to 16x16, which is already the model size.
        let img = RgbImage::from_pixel(16, 8, image::Rgb([255, 0, 0]));
        let mut cfg = ImageProcessorConfig::clip(16);
        cfg.pad_to_square = true;
        let t = cfg
            .preprocess(
                &DynamicImage::ImageRgb8(img),
                Path::new("mem"),
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(t.dims(), [3, 16, 16]);
        // The top-left corner is background: (122/255 - mean) / std.
        let v: f32 = t
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            (v - (122.0 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6,
            "{v}"
        );
    }

    #[test]
    fn resize_of_constant_image_is_constant_and_identity_is_exact() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        let out = resize_pil(&img, 13, 29, Resample::Bicubic);
        assert!(
            out.pixels().all(|p| p.0 == [200, 10, 99]),
            "weights sum to one"
        );
        let grad = RgbImage::from_fn(9, 9, |x, y| image::Rgb([(x * 20) as u8, (y * 20) as u8, 7]));
        assert_eq!(resize_pil(&grad, 9, 9, Resample::Bicubic), grad);
    }
}
