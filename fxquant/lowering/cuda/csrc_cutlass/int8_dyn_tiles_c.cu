// W8A8 int8 dynamic GEMM variants 8-11: clusters of two CTAs along M (see scaled_int8_gemm.cuh).
#define FXQ_I8_DEFINE_CONFIG
#include "scaled_int8_gemm.cuh"

namespace fxq_i8 {
int run_tiles_c(int variant, const Problem& p, size_t* need) {
  switch (variant) {  // TileShape is (M, N, K)
    case 8: return Config<Shape<_128, _256, _128>, Cl2, Coop, CoopEpi>::run(p, need);
    case 9: return Config<Shape<_256, _128, _128>, Cl2, Coop, CoopEpi>::run(p, need);
    case 10: return Config<Shape<_128, _256, _128>, Cl2, Coop, CoopEpi, StreamK>::run(p, need);
    case 11: return Config<Shape<_128, _128, _128>, Cl2, Ping, PingEpi>::run(p, need);
    default: return -1;
  }
}
}  // namespace fxq_i8
