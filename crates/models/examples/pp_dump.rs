fn main() {
    let a: Vec<String> = std::env::args().collect();
    let t = openuni_models::internvl_preprocess::load_image(std::path::Path::new(&a[1]), a[3].parse().unwrap(), a[4].parse().unwrap()).unwrap();
    let v = t.to_f32_vec();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&a[2], bytes).unwrap();
    println!("{}", t.shape);
}
