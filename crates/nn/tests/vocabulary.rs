//! Models the byte-level evaluation cannot score are refused up front.

use amalgam_nn::eval::check_vocabulary;
use amalgam_nn::Decoder;
use amalgam_zoo::ZooSize;

#[test]
fn models_without_the_byte_vocabulary_are_refused() {
    let mut shape = ZooSize::named("micro").unwrap().shape;
    shape.vocab_size = 100;
    let model = Decoder::new(shape, tch::Device::Cpu, 0);
    let message = check_vocabulary(&model).unwrap_err().to_string();
    assert!(message.contains("vocabulary has 100 tokens"), "{message}");
    let full = Decoder::new(ZooSize::named("micro").unwrap().shape, tch::Device::Cpu, 0);
    assert!(check_vocabulary(&full).is_ok());
}
