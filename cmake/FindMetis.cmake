# Debian's libmetis-dev ships no CMake config: find the header and library by hand. Optional: without it the
# `metis` grouping method reports that it was not built (the GPU machine, for one, has no METIS).
find_path(METIS_INCLUDE_DIR metis.h)
find_library(METIS_LIBRARY metis)
if(METIS_INCLUDE_DIR AND METIS_LIBRARY)
  set(METIS_FOUND TRUE)
  add_library(metis::metis UNKNOWN IMPORTED)
  set_target_properties(metis::metis PROPERTIES IMPORTED_LOCATION ${METIS_LIBRARY}
                        INTERFACE_INCLUDE_DIRECTORIES ${METIS_INCLUDE_DIR})
else()
  set(METIS_FOUND FALSE)
  message(WARNING "METIS not found (apt-get install libmetis-dev): the metis grouping method is disabled")
endif()
