// The fp8 instantiations of dynamic_mma.cuh's launcher (a unit of their own: ninja compiles the
// units of the library in parallel).
#include "dynamic_mma.cuh"

namespace fxquant {
namespace dyn {
template void launch<true, false, __nv_bfloat16>(const Args&);
template void launch<true, false, __half>(const Args&);
template void launch<true, true, __nv_bfloat16>(const Args&);
template void launch<true, true, __half>(const Args&);
}  // namespace dyn
}  // namespace fxquant
