// W8A8 int8 dynamic GEMM variants 0-3 (see scaled_int8_gemm.cuh; the numbers are cutlass.py's I8_VARIANTS).
#define FXQ_I8_DEFINE_CONFIG
#include "scaled_int8_gemm.cuh"

namespace fxq_i8 {
int run_tiles_a(int variant, const Problem& p, size_t* need) {
  switch (variant) {  // TileShape is (M, N, K)
    case 0: return Config<Shape<_128, _128, _128>, One, Coop, CoopEpi>::run(p, need);
    case 1: return Config<Shape<_128, _256, _128>, One, Coop, CoopEpi>::run(p, need);
    case 2: return Config<Shape<_256, _128, _128>, One, Coop, CoopEpi>::run(p, need);
    case 3: return Config<Shape<_128, _256, _128>, One, Coop, CoopEpi, StreamK>::run(p, need);
    default: return -1;
  }
}
}  // namespace fxq_i8
