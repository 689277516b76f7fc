//! The bag-of-words pieces on hand-computed values.

use super::*;

#[test]
fn words_are_lowercased_alphanumeric_runs() {
    let w: Vec<String> = words("A red circle in the top-left; The word CAT.").collect();
    assert_eq!(
        w,
        [
            "a", "red", "circle", "in", "the", "top", "left", "the", "word", "cat"
        ]
    );
}

#[test]
fn vocabulary_comes_from_training_captions_only_and_is_sorted() {
    let train = vec!["Red circle.".to_string(), "Blue circle".to_string()];
    let all = vec![
        train[0].clone(),
        train[1].clone(),
        "green circle red".to_string(),
    ];
    let l = Labels::new(&train, &all);
    assert_eq!(l.vocab, ["blue", "circle", "red"]);
    assert_eq!(l.present, vec![vec![1, 2], vec![0, 1], vec![1, 2]]);
    let t: Vec<Vec<f32>> = l.targets(&[2, 1]).unwrap().to_vec2().unwrap();
    assert_eq!(t, vec![vec![0.0, 1.0, 1.0], vec![1.0, 1.0, 0.0]]);
}

#[test]
fn bce_with_logits_matches_the_definition() {
    let x = Tensor::new(&[[0.0f32, 2.0], [-3.0, 30.0]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[1.0f32, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    let got = bce_with_logits_sum(&x, &y)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    // -ln σ(0) - ln(1-σ(2)) - ln σ(-3) - ln σ(30)
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    let want = -sig(0.0).ln() - (1.0 - sig(2.0)).ln() - sig(-3.0).ln() - sig(30.0).ln();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn macro_f1_skips_words_without_support() {
    let s = |support, precision, recall| WordScore {
        word: String::new(),
        support,
        precision,
        recall,
    };
    let f = macro_f1(&[s(4, 1.0, 0.5), s(0, 0.0, 0.0), s(2, 0.0, 0.0)]);
    assert!((f - (2.0 / 3.0) / 2.0).abs() < 1e-12, "{f}");
}
