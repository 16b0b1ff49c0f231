"""Matrix products every kernel family shares (``@triton.jit`` only)."""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, LOWP: tl.constexpr, F32_PRECISION: tl.constexpr):
    # [M, R] x [R, N] -> float32. bf16/fp16 operands feed the tensor cores as they are (the eager head
    # does its Linear in bf16 under autocast too); otherwise float32 with F32_PRECISION (3xTF32 on a
    # GPU, "ieee" under the interpreter, which also upcasts 16-bit operands: launchers pass LOWP=False)
    if LOWP:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=F32_PRECISION)
