//! Tensors in [-1, 1] to 8-bit RGB images, PNG bytes and grids, as diffusers' `numpy_to_pil` and
//! `make_image_grid` do it: `round((x / 2 + 0.5).clamp(0, 1) * 255)` (round half to even, like NumPy).

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder, RgbImage};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("expected a [N, 3, H, W] tensor, got {0:?}")]
    Shape(Vec<i64>),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("png: {0}")]
    Png(#[from] image::ImageError),
}

/// `[N, 3, H, W]` samples in [-1, 1] → N RGB images.
pub fn to_images(samples: &Tensor) -> Result<Vec<RgbImage>, ImageError> {
    let size = samples.size();
    let [n, 3, h, w] = size[..] else {
        return Err(ImageError::Shape(size));
    };
    let u8s = ((samples.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(tch::Device::Cpu);
    let bytes = Vec::<u8>::try_from(u8s.reshape([-1]))?;
    let per = (h * w * 3) as usize;
    Ok(bytes
        .chunks_exact(per)
        .take(n as usize)
        .map(|c| {
            RgbImage::from_raw(w as u32, h as u32, c.to_vec()).expect("chunk has H*W*3 bytes. This is a bug.")
        })
        .collect())
}

/// PNG bytes of an RGB image. Fast deflate with adaptive filters: dataset images are written once per
/// sample, so encode speed matters more than the last few percent of size.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::with_capacity(img.as_raw().len() / 2);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive).write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// Columns for `n` tiles: the smallest square that holds them.
pub fn grid_columns(n: usize) -> usize {
    (1..=n.max(1)).find(|c| c * c >= n).unwrap_or(1)
}

/// Row-major tiles on a black canvas (`make_image_grid`); all tiles share the first one's size.
pub fn make_grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let Some(first) = images.first() else {
        return RgbImage::new(0, 0);
    };
    let cols = cols.clamp(1, images.len());
    let rows = images.len().div_ceil(cols);
    let (w, h) = first.dimensions();
    let mut grid = RgbImage::new(w * cols as u32, h * rows as u32);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % cols) as u32 * w, (i / cols) as u32 * h);
        image::imageops::replace(&mut grid, img, x as i64, y as i64);
    }
    grid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_mapping_rounds_half_to_even_and_clamps() {
        // x = -1 → 0, x = 1 → 255, beyond the range clamps; x = 0 gives 127.5, rounded to 128 (even).
        let x = Tensor::from_slice(&[-1.0f32, 1.0, -3.0, 3.0, 0.0, 1.0]).view([1, 3, 1, 2]);
        let img = &to_images(&x).unwrap()[0];
        // NCHW [1,3,1,2] → pixel (0,0) = channels (x0, x2, x4), pixel (1,0) = (x1, x3, x5).
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 128]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
    }

    #[test]
    fn png_round_trips() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let png = encode_png(&img).unwrap();
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back, img);
    }

    #[test]
    fn grid_places_tiles_row_major() {
        let tiles: Vec<RgbImage> =
            (0..5).map(|i| RgbImage::from_pixel(2, 2, image::Rgb([i * 10, 0, 0]))).collect();
        assert_eq!(grid_columns(5), 3);
        let g = make_grid(&tiles, 3);
        assert_eq!(g.dimensions(), (6, 4));
        assert_eq!(g.get_pixel(4, 0).0[0], 20);
        assert_eq!(g.get_pixel(2, 2).0[0], 40);
        assert_eq!(g.get_pixel(4, 2).0, [0, 0, 0]);
    }
}
