// Native stack on SIGSEGV, for machines without gdb: gcc -shared -fPIC -O1 segv_backtrace.c -o segv.so, then
// LD_PRELOAD=$PWD/segv.so python3 ... (a Python run without -X faulthandler, which would replace the handler).
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>
static void on_segv(int sig) {
  void* frames[64];
  int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, 2);
  _exit(139);
}
__attribute__((constructor)) static void install(void) {
  void* warm[1];
  backtrace(warm, 1);  // loads libgcc now: the first call may allocate, which a signal handler must not
  signal(SIGSEGV, on_segv);
}
