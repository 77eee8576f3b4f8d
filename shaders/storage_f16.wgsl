// Element type of Q, K, V and the output in memory: f16 (needs the SHADER_F16 feature). Loads
// convert to f32, so scores, softmax statistics and accumulators stay f32.
enable f16;
alias Storage = f16;
