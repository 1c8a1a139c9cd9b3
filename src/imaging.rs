//! Tensors in [-1, 1] to 8-bit images (RGB, or grayscale for one-channel models), PNG bytes and grids,
//! as diffusers' `numpy_to_pil` and `make_image_grid` do it: `round((x / 2 + 0.5).clamp(0, 1) * 255)`
//! (round half to even, like NumPy); `numpy_to_pil` makes mode "L" images of single-channel samples.

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, GrayImage, ImageEncoder, RgbImage};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("expected a [N, 1 or 3, H, W] tensor, got {0:?}")]
    Shape(Vec<i64>),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("png: {0}")]
    Png(#[from] image::ImageError),
}

/// `[N, C, H, W]` samples in [-1, 1] → N images: RGB for C = 3, grayscale for C = 1.
pub fn to_images(samples: &Tensor) -> Result<Vec<DynamicImage>, ImageError> {
    let size = samples.size();
    let [n, c @ (1 | 3), h, w] = size[..] else {
        return Err(ImageError::Shape(size));
    };
    let u8s = ((samples.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(tch::Device::Cpu);
    let bytes = Vec::<u8>::try_from(u8s.reshape([-1]))?;
    let per = (h * w * c) as usize;
    let (w, h) = (w as u32, h as u32);
    Ok(bytes
        .chunks_exact(per)
        .take(n as usize)
        .map(|px| {
            let px = px.to_vec();
            let img = if c == 1 {
                GrayImage::from_raw(w, h, px).map(DynamicImage::ImageLuma8)
            } else {
                RgbImage::from_raw(w, h, px).map(DynamicImage::ImageRgb8)
            };
            img.expect("chunk has H*W*C bytes. This is a bug.")
        })
        .collect())
}

/// PNG bytes of an 8-bit image (RGB or grayscale). Fast deflate with adaptive filters: dataset images
/// are written once per sample, so encode speed matters more than the last few percent of size.
pub fn encode_png(img: &DynamicImage) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::with_capacity(img.as_bytes().len() / 2);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive).write_image(
        img.as_bytes(),
        img.width(),
        img.height(),
        img.color().into(),
    )?;
    Ok(out)
}

/// Columns for `n` tiles: the smallest square that holds them.
pub fn grid_columns(n: usize) -> usize {
    (1..=n.max(1)).find(|c| c * c >= n).unwrap_or(1)
}

/// Row-major tiles on a black canvas (`make_image_grid`); all tiles share the first one's size and
/// colour type.
pub fn make_grid(images: &[DynamicImage], cols: usize) -> DynamicImage {
    let Some(first) = images.first() else {
        return DynamicImage::new_rgb8(0, 0);
    };
    let cols = cols.clamp(1, images.len());
    let rows = images.len().div_ceil(cols);
    let (w, h) = (first.width(), first.height());
    let mut grid = DynamicImage::new(w * cols as u32, h * rows as u32, first.color());
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % cols) as u32 * w, (i / cols) as u32 * h);
        image::imageops::replace(&mut grid, img, x as i64, y as i64);
    }
    grid
}

/// A grid of labelled tiles, one class to a row: each run of tiles of one class (in the order given)
/// starts a new row and wraps at `cols`; the cells after a class's last tile stay black.
pub fn make_class_grid(tiles: &[(u32, DynamicImage)], cols: usize) -> DynamicImage {
    let Some((_, first)) = tiles.first() else {
        return DynamicImage::new_rgb8(0, 0);
    };
    let cols = cols.max(1);
    let mut cells: Vec<(usize, usize)> = Vec::with_capacity(tiles.len());
    let (mut row, mut col) = (0usize, 0usize);
    for (i, (class, _)) in tiles.iter().enumerate() {
        if i > 0 && (tiles[i - 1].0 != *class || col == cols) {
            (row, col) = (row + 1, 0);
        }
        cells.push((row, col));
        col += 1;
    }
    let width = cells.iter().map(|&(_, c)| c + 1).max().unwrap_or(1);
    let (w, h) = (first.width(), first.height());
    let mut grid = DynamicImage::new(w * width as u32, h * (row + 1) as u32, first.color());
    for ((_, img), &(r, c)) in tiles.iter().zip(&cells) {
        image::imageops::replace(&mut grid, img, (c as u32 * w) as i64, (r as u32 * h) as i64);
    }
    grid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_grids_start_a_row_per_class_and_wrap() {
        let tile = |v: u8| DynamicImage::ImageLuma8(image::GrayImage::from_pixel(1, 1, image::Luma([v])));
        // Class 0 three times, class 1 once, class 2 twice; two columns.
        let tiles: Vec<(u32, DynamicImage)> =
            [(0, 10), (0, 11), (0, 12), (1, 20), (2, 30), (2, 31)].map(|(c, v)| (c, tile(v))).into();
        let grid = make_class_grid(&tiles, 2).to_luma8();
        assert_eq!((grid.width(), grid.height()), (2, 4));
        let rows: Vec<Vec<u8>> = grid.rows().map(|r| r.map(|p| p.0[0]).collect()).collect();
        assert_eq!(rows, [vec![10, 11], vec![12, 0], vec![20, 0], vec![30, 31]]);
    }

    #[test]
    fn pixel_mapping_rounds_half_to_even_and_clamps() {
        // x = -1 → 0, x = 1 → 255, beyond the range clamps; x = 0 gives 127.5, rounded to 128 (even).
        let x = Tensor::from_slice(&[-1.0f32, 1.0, -3.0, 3.0, 0.0, 1.0]).view([1, 3, 1, 2]);
        let img = to_images(&x).unwrap()[0].to_rgb8();
        // NCHW [1,3,1,2] → pixel (0,0) = channels (x0, x2, x4), pixel (1,0) = (x1, x3, x5).
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 128]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
    }

    #[test]
    fn one_channel_samples_become_grayscale_pngs() {
        let x = Tensor::from_slice(&[-1.0f32, 0.0, 1.0, 0.5]).view([2, 1, 1, 2]);
        let images = to_images(&x).unwrap();
        assert_eq!(images[0].color(), image::ColorType::L8);
        assert_eq!(images[0].as_bytes(), [0, 128]);
        assert_eq!(images[1].as_bytes(), [255, 191]);
        let png = encode_png(&images[1]).unwrap();
        let back = image::load_from_memory(&png).unwrap();
        assert_eq!((back.color(), back.as_bytes()), (image::ColorType::L8, &[255u8, 191][..]));
        assert_eq!(make_grid(&images, 2).color(), image::ColorType::L8);
        assert!(to_images(&Tensor::zeros([1, 2, 1, 1], (Kind::Float, tch::Device::Cpu))).is_err());
    }

    #[test]
    fn png_round_trips() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let png = encode_png(&DynamicImage::ImageRgb8(img.clone())).unwrap();
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back, img);
    }

    #[test]
    fn grid_places_tiles_row_major() {
        let tiles: Vec<DynamicImage> = (0..5)
            .map(|i| DynamicImage::ImageRgb8(RgbImage::from_pixel(2, 2, image::Rgb([i * 10, 0, 0]))))
            .collect();
        assert_eq!(grid_columns(5), 3);
        let g = make_grid(&tiles, 3).to_rgb8();
        assert_eq!(g.dimensions(), (6, 4));
        assert_eq!(g.get_pixel(4, 0).0[0], 20);
        assert_eq!(g.get_pixel(2, 2).0[0], 40);
        assert_eq!(g.get_pixel(4, 2).0, [0, 0, 0]);
    }
}
