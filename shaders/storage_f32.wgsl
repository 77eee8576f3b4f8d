// Element type of Q, K, V and the output in memory: f32. Every program starts with this line or
// with storage_f16.wgsl, and converts to f32 on load, so all arithmetic is f32.
alias Storage = f32;
