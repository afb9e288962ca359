"""GGML tensor type ids used by dlmnumba, in one place (ggml.h's numbering, which the gguf
package's GGMLQuantizationType follows, plus bitnet.cpp's I2_S, which it lacks)."""

F32 = 0
F16 = 1
Q8_0 = 8
Q6_K = 14
BF16 = 30
TQ1_0 = 34
TQ2_0 = 35
I2_S = 36  # bitnet.cpp's ternary type

TERNARY = {"TQ1_0": TQ1_0, "TQ2_0": TQ2_0, "I2_S": I2_S}  # name -> id
