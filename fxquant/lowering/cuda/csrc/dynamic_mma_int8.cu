// The int8 instantiations of dynamic_mma.cuh's launcher (a unit of their own: ninja compiles the
// units of the library in parallel).
#include "dynamic_mma.cuh"

namespace fxquant {
namespace dyn {
template void launch<false, false, __nv_bfloat16>(const Args&);
template void launch<false, false, __half>(const Args&);
template void launch<false, true, __nv_bfloat16>(const Args&);
template void launch<false, true, __half>(const Args&);
}  // namespace dyn
}  // namespace fxquant
