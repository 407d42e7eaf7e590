# Runs at install time (cmake --install, cpack), included by cmake_install.cmake: turns
# one @VAR@ template into the file for the prefix being installed to, and installs it.
# Paths inside installed files (the daemons' path in the vhost-user descriptors and the
# systemd units, the prefix in vhostkit.pc) are those of the real installation, not of
# the build.
#
# In:  VHOSTKIT_TEMPLATE     the template
#      VHOSTKIT_DESTINATION  where to install it: a directory relative to the prefix, or
#                            one of the markers <unitdir> and <sysconfdir>/... (below)
#      VHOSTKIT_WORK_DIR     scratch directory in the build tree
#      VHOSTKIT_VARS         a script that sets the configure-time values (version, dirs)
include("${VHOSTKIT_VARS}")

set(VHOSTKIT_PREFIX "${CMAKE_INSTALL_PREFIX}")
set(VHOSTKIT_BINDIR "${VHOSTKIT_PREFIX}/${VHOSTKIT_INSTALL_BINDIR}")
# Debian keeps /etc and /lib/systemd/system outside /usr; other prefixes keep them inside.
if(VHOSTKIT_PREFIX STREQUAL "/usr")
  set(VHOSTKIT_SYSCONFDIR "/etc")
  set(VHOSTKIT_UNITDIR "/lib/systemd/system")
else()
  set(VHOSTKIT_SYSCONFDIR "${VHOSTKIT_PREFIX}/etc")
  set(VHOSTKIT_UNITDIR "${VHOSTKIT_PREFIX}/lib/systemd/system")
endif()

if(VHOSTKIT_DESTINATION STREQUAL "<unitdir>")
  set(destination "${VHOSTKIT_UNITDIR}")
else()
  set(destination "${VHOSTKIT_PREFIX}/${VHOSTKIT_DESTINATION}")
endif()

# One scratch directory per destination root, so that installs to different prefixes
# (ctest's temporary prefix and cpack's staging run at the same time) do not collide.
string(MD5 key "$ENV{DESTDIR}|${VHOSTKIT_PREFIX}")
get_filename_component(name "${VHOSTKIT_TEMPLATE}" NAME)
string(REGEX REPLACE "\\.in$" "" name "${name}")
set(configured "${VHOSTKIT_WORK_DIR}/${key}/${name}")
configure_file("${VHOSTKIT_TEMPLATE}" "${configured}" @ONLY)
file(INSTALL DESTINATION "${destination}" TYPE FILE FILES "${configured}")
