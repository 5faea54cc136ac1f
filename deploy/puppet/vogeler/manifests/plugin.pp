# @summary One plugin file in /etc/vogeler/plugins.d, validated with
#   `vogeler-agent plugins check` before it is put in place (a broken file never reaches the
#   agent, which picks up changes by itself).
#
# @param content  The plugin file's text (TOML).
# @param source   Or a file to copy (puppet:///modules/...).
# @param mode     0755 for scripts that plugins run, 0644 for plugin files.
# @param ensure   present or absent.
#
# @example
#   vogeler::plugin { 'nginx_sites':
#     content => @(TOML),
#       name = "nginx_sites"
#       command = ["ls", "/etc/nginx/sites-enabled"]
#       format = "lines"
#       | TOML
#   }
define vogeler::plugin (
  Optional[String[1]]       $content = undef,
  Optional[String[1]]       $source = undef,
  String[4, 4]              $mode = '0644',
  Enum['present', 'absent'] $ensure = 'present',
) {
  if $ensure == 'present' and $content == undef and $source == undef {
    fail("vogeler::plugin ${title}: give content or source")
  }
  file { "/etc/vogeler/plugins.d/${title}.toml":
    ensure       => $ensure ? { 'present' => file, default => absent },
    owner        => 'root',
    group        => 'root',
    mode         => $mode,
    content      => $content,
    source       => $source,
    validate_cmd => '/usr/bin/vogeler-agent plugins check %',
    require      => Package['vogeler-agent'],
    # In place before a first start; later changes are picked up by the running agent.
    before       => Service['vogeler-agent'],
  }
}
