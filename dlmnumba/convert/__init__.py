"""`dlmnumba convert`: a Hugging Face BitNet checkpoint directory to a GGUF file.

checkpoint.py reads and checks the directory (config.json, the safetensors files, their
index) and reads tensors one at a time; weights.py turns the checkpoint's weight forms into
ternary codes and one scale per tensor (bf16/f16/f32 master weights: the absmean recipe;
Microsoft's packed 2-bit form: unpacked exactly); tokenizer.py turns tokenizer.json and
tokenizer_config.json into GGUF vocabulary metadata; writer.py plans every tensor, then streams
them into the file.  The GGUF helpers come from synth/ (writers stay beside the reader, not in
it); nothing here loads a model.
"""
