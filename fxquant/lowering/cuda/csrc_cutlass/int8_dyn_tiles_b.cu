// W8A8 int8 dynamic GEMM variants 4-7 (see scaled_int8_gemm.cuh; the numbers are cutlass.py's I8_VARIANTS).
#define FXQ_I8_DEFINE_CONFIG
#include "scaled_int8_gemm.cuh"

namespace fxq_i8 {
int run_tiles_b(int variant, const Problem& p, size_t* need) {
  switch (variant) {  // TileShape is (M, N, K)
    case 4: return Config<Shape<_128, _128, _128>, One, Ping, PingEpi>::run(p, need);
    case 5: return Config<Shape<_64, _128, _128>, One, Ping, PingEpi>::run(p, need);
    case 6: return Config<Shape<_64, _256, _128>, One, Ping, PingEpi>::run(p, need);
    case 7: return Config<Shape<_128, _128, _128>, One, Coop, CoopEpi, StreamK>::run(p, need);
    default: return -1;
  }
}
}  // namespace fxq_i8
