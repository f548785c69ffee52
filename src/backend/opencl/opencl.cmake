# The OpenCL backend (src/backend/opencl): its C++ sources join kestrel_lib only when
# KESTREL_OPENCL is on, and each kernels/*.cl file is embedded as a raw-string header
# (<build>/generated/backend/opencl/kernels/<name>_cl.h) regenerated whenever the .cl changes.
# Included from the top-level CMakeLists.txt after kestrel_lib exists.
set(KESTREL_OPENCL_DIR ${CMAKE_SOURCE_DIR}/src/backend/opencl)
if(KESTREL_OPENCL)
  find_package(OpenCL REQUIRED)
  file(GLOB KESTREL_CL_KERNELS CONFIGURE_DEPENDS ${KESTREL_OPENCL_DIR}/kernels/*.cl)
  set(KESTREL_CL_GENERATED ${CMAKE_BINARY_DIR}/generated)
  set(KESTREL_CL_HEADERS)
  foreach(cl ${KESTREL_CL_KERNELS})
    get_filename_component(stem ${cl} NAME_WE)
    set(out ${KESTREL_CL_GENERATED}/backend/opencl/kernels/${stem}_cl.h)
    add_custom_command(OUTPUT ${out}
      COMMAND ${CMAKE_COMMAND} -DIN=${cl} -DOUT=${out} -DNAME=${stem}
              -P ${KESTREL_OPENCL_DIR}/embed_cl.cmake
      DEPENDS ${cl} ${KESTREL_OPENCL_DIR}/embed_cl.cmake
      COMMENT "Embedding OpenCL kernels ${stem}.cl" VERBATIM)
    list(APPEND KESTREL_CL_HEADERS ${out})
  endforeach()
  add_custom_target(kestrel_cl_sources DEPENDS ${KESTREL_CL_HEADERS})
  add_dependencies(kestrel_lib kestrel_cl_sources)
  target_sources(kestrel_lib PRIVATE ${KESTREL_CL_HEADERS})
  target_include_directories(kestrel_lib PRIVATE ${KESTREL_CL_GENERATED})
  # The 1.2 API runs on every driver (NVIDIA's 3.0, PoCL 3.x, mobile 2.0/3.0 ones).
  target_compile_definitions(kestrel_lib PUBLIC KESTREL_OPENCL
                             CL_TARGET_OPENCL_VERSION=120)
  target_link_libraries(kestrel_lib PUBLIC OpenCL::OpenCL)
endif()
