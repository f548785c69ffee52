# Turns one OpenCL C source into a C++ header holding it as a raw string literal, so that the
# kernels travel inside the binary (no files to find at run time). Run at build time:
#   cmake -DIN=<file.cl> -DOUT=<file_cl.h> -DNAME=<identifier> -P embed_cl.cmake
file(READ "${IN}" text)
string(FIND "${text}" ")KESTREL_CL\"" clash)
if(NOT clash EQUAL -1)
  message(FATAL_ERROR "${IN} contains the raw-string delimiter )KESTREL_CL\"")
endif()
file(WRITE "${OUT}.tmp"
  "// Generated from ${IN} by embed_cl.cmake; edit the .cl file, not this one.\n"
  "#pragma once\n"
  "namespace kestrel::backend::opencl::sources {\n"
  "inline constexpr const char ${NAME}[] = R\"KESTREL_CL(${text})KESTREL_CL\";\n"
  "}  // namespace kestrel::backend::opencl::sources\n")
file(COPY_FILE "${OUT}.tmp" "${OUT}" ONLY_IF_DIFFERENT)
file(REMOVE "${OUT}.tmp")
