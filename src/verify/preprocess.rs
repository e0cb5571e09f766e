//! Case component `preprocess`: the model card's `load_image` on the case's image file
//! (`image.png`, `.jpg`, `.jpeg` or `.webp`; case.json `image` may name it), case.json `max_num`
//! (and optional `input_size`, default 448) -> io `pixel_values` [T,3,S,S] f32, compared bit for
//! bit (Pillow's fixed-point BICUBIC and torchvision's f32 normalisation are exact rules).

use anyhow::{bail, Context, Result};
use openuni_models::internvl_preprocess::{load_image, INPUT_SIZE};

use super::{Case, Kind, Options, Produced};

const IMAGE_NAMES: [&str; 4] = ["image.png", "image.jpg", "image.jpeg", "image.webp"];

pub fn run(case: &Case, opts: &Options) -> Result<Vec<Produced>> {
    if opts.device != crate::exec::Device::Cpu {
        eprintln!("note: preprocessing runs on the host whatever --device says");
    }
    let cj = case.dir.join("case.json");
    let max_num = case.json["max_num"]
        .as_u64()
        .with_context(|| format!("{}: no integer \"max_num\"", cj.display()))?
        as usize;
    let input_size = match case.json.get("input_size") {
        None => INPUT_SIZE,
        Some(v) => v.as_u64().with_context(|| {
            format!(
                "{}: \"input_size\" must be an integer, found {v}",
                cj.display()
            )
        })? as usize,
    };
    let image = match case.json.get("image").and_then(|v| v.as_str()) {
        Some(name) => case.dir.join(name),
        None => {
            let found: Vec<_> = IMAGE_NAMES
                .iter()
                .map(|n| case.dir.join(n))
                .filter(|p| p.is_file())
                .collect();
            match found.as_slice() {
                [one] => one.clone(),
                [] => bail!(
                    "{}: no image file (expected one of {})",
                    case.dir.display(),
                    IMAGE_NAMES.join(", ")
                ),
                _ => bail!(
                    "{}: several image files; name one with \"image\" in case.json",
                    case.dir.display()
                ),
            }
        }
    };
    let pixel_values = load_image(&image, input_size, max_num)?;
    Ok(vec![Produced {
        reference: "pixel_values".into(),
        tensor: pixel_values,
        decisive: true,
        kind: Kind::Exact,
    }])
}
